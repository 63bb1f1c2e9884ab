"""The demo model's training pipeline: corpus, tokenizer, FIM and chat data, batches, model, export, evaluation.
Run it with `python training/train_demo.py` (see that file)."""
