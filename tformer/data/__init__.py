"""Text to tokens and tokens to batches.

- `tokenizer`: special tokens, building and loading tokenizers, decoding;
- `corpus`: the built-in corpus, finding files, reading them in bounded pieces;
- `prepare`: `tformer tokenize`, a corpus streamed into token files;
- `tokens`: token files read back; `batches`: training objectives and batches.
"""
