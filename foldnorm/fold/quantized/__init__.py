"""Quantized models: the rule that folds into a layer with a quantized weight (rules), the integer
arithmetic (weights) and the comparison of quantized outputs in their steps (steps)."""
