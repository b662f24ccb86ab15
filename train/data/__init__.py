"""Data for training: a text corpus, a BPE tokenizer, cached token shards and a random-access reader.

Typical use:

    data_dir = prepare_dataset("embedded", cache_dir)        # or a list of .txt/.jsonl files
    train = TokenDataset(data_dir, "train")
    batch = train.sample_batch(seed, step, batch_size, seq_len)  # [batch_size, seq_len + 1] int64
"""

from train.data.corpus import TextFile, embedded_corpus_documents, read_text_documents
from train.data.layout import FORMAT_VERSION
from train.data.loader import TokenDataset, read_meta
from train.data.preparation import EMBEDDED_SOURCE, prepare_dataset
from train.data.tokenizer import EOT, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "EMBEDDED_SOURCE",
    "EOT",
    "FORMAT_VERSION",
    "TextFile",
    "TokenDataset",
    "embedded_corpus_documents",
    "load_tokenizer",
    "prepare_dataset",
    "read_meta",
    "read_text_documents",
    "train_bpe_tokenizer",
]
