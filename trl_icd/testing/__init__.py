"""Tiny, offline, randomly initialised models, tokenizers and processors built from configs (tests, benchmarks,
and users without Hub access). Nothing here downloads anything."""
