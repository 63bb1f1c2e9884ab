from dschat.cli.main import main

main()
