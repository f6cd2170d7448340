"""Evaluators run by the trainer and by `main.py --mode=evaluate` (retrieval on Product1M)."""
