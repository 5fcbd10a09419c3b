"""Research code of engram-llama, outside the shipped package: the accuracy harness (through the
product's `ask`), its data sets, the generated-model maker and the attention probe. Run it from
the repository root as `python -m research ...` (research/eval.py)."""
