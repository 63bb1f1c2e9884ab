"""`dschat serve`: one local HTTP server for editors, scripts and other programs, on one loaded engine.

It speaks three shapes of API, each in its own module: OpenAI's (openai_api.py), llama.cpp's server
(llamacpp_api.py: /infill for llama.vim and llama.vscode) and ollama's (ollama_api.py: Continue, Twinny).
schemas.py validates the request bodies, generation.py turns a request into prompt ids and runs it on the
engine, queue.py is the single engine's FIFO queue and worker thread, app.py puts the routes, the limits and
the errors together, and command.py is the command line. native.py is dschat's own small endpoint (token ids
in, token ids out), which `dschat --server` runs on through client.py; discovery.py is the file by which a
local dschat finds a running server.
"""
