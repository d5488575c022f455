"""Text corpora, tokenizers and the WebDataset pipeline (docs/data.md).

corpus.py    the bundled corpus and documents from files
tokenizer.py tokenizers with special-token roles ('gpt2', tokenizer.json, vocab/merges), fingerprints
prepare.py   documents -> tokenized shards + index.json (`calm-prepare-data`)
shards.py    writing (atomic, resumable) and reading (checked) shards
index.py     the index beside the shards; the tokenizer check
packing.py   documents -> blocks: LM, autoencoder and evaluation packings
plan.py      which shards each rank and worker reads per epoch, and how many batches
loader.py    the endless, exactly resumable training loader; evaluation blocks
"""
