"""Data: documents from a source (corpus.py), tokenizers (tokenize.py) and the memory-mapped token store (store.py).

Its contract is `store.prepare_data(DataConfig) -> TokenData`: a training and a validation token file of one
corpus, cut and tokenized once and cached under $SCALING_CACHE by their content hash, with the batches a trial
draws from them by step and seed; `DataError` is every bad data input, one line. It knows nothing of models,
training or MLflow.
"""
