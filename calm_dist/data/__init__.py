"""Text corpora, tokenizers and the WebDataset pipeline (docs/data.md).

corpus.py    the bundled corpus and documents from files
tokenizer.py tokenizers with special-token roles ('gpt2', tokenizer.json, vocab/merges), fingerprints
prepare.py   documents -> tokenized shards + index.json (`calm-prepare-data`)
synthetic.py Markov-chain sources with a known law: sampling, closed-form Brier, the oracle's energy
synthetic_prepare.py  a synthetic source -> shards, tokenizer.json, synthetic.json (`--synthetic`)
shards.py    writing (atomic, resumable) and reading (checked) shards
index.py     the index beside the shards; the tokenizer check
packing.py   documents -> blocks: LM, autoencoder and evaluation packings
plan.py      which shards each rank and worker reads per epoch, and how many batches
block_shuffle.py  blocks served in seeded windows, so batches mix documents (data.shuffle_blocks)
loader.py    the endless, exactly resumable training loader; evaluation blocks
"""
