"""What the tests, the benchmarks and the training scripts share: tiny random checkpoints in the hub layout
(`tiny_checkpoints`) and the independent reference they are checked against (`reference`, transformers).

It is installed with dschat, so a script reaches it from any directory; nothing here is used by the app."""
