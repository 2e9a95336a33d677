"""The shared peer config (../shared/peers/torchtitan/peers_titan) at the vocabulary of its asset
folder: that config fixes the vocabulary at 32000, while make_assets.py can build a corpus and
tokenizer at any (its stamp.json records it). The embedding, the output layer and the loss's
vocabulary are set from the stamp; everything else is the shared config, unchanged.

Used as: torchrun ... titan_cpu_train.py --module titan_vocab --config llama3_peers_vocab ...
with PYTHONPATH holding both this folder's parent and the shared runner's folder."""
import dataclasses
import json
import os
from pathlib import Path

from peers_titan.config_registry import llama3_peers


def llama3_peers_vocab():
    vocab = json.loads(Path(os.environ["PEERS_ASSET"], "stamp.json").read_text())["V"]
    cfg = llama3_peers()
    model = cfg.model_spec.model
    model = dataclasses.replace(
        model, vocab_size=vocab,
        tok_embeddings=dataclasses.replace(model.tok_embeddings, num_embeddings=vocab),
        lm_head=dataclasses.replace(model.lm_head, out_features=vocab))
    cfg.model_spec = dataclasses.replace(cfg.model_spec, model=model)
    cfg.loss = dataclasses.replace(cfg.loss, loss_fn=dataclasses.replace(cfg.loss.loss_fn, global_vocab_size=vocab))
    return cfg
