"""The attention floor: the backend contract the model calls (`backend.py`), the step metadata it
reads, and dense paged attention (the baseline, and the dense layers of the SPIN backend)."""
