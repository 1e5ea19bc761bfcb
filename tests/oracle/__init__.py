"""The PyTorch/transformers oracle: hf_oracle.py runs in .venv-oracle (Python 3.11 + torch CPU);
client.py is what the 3.12 tests import to call it."""
