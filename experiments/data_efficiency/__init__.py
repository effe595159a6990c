"""The data-efficiency experiment: runner (`run.py`), bookkeeping and chart (`analysis.py`)."""
