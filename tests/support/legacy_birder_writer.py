"""Run by tests/test_legacy_birder.py under an old birder release (its folder first on PYTHONPATH).

Writes, with that release's own functions, a weights file and its json into ``OUT/models/`` and the
embedding that release computes for the numpy batch in ``OUT/input.npy`` (NHWC) into ``OUT/embedding.npy``;
prints a JSON summary (birder version, file paths, a few state-dict keys, the json's keys).

    python legacy_birder_writer.py OUT NETWORK SEED CONFIG_JSON|-
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(out: str, network: str, seed: str, config_text: str) -> None:
    import torch
    from birder.common import fs_ops
    from birder.model_registry import registry
    from birder.net.base import get_signature
    from birder.version import __version__

    os.chdir(out)  # birder writes models/<name>_<epoch>.pt and models/<name>.json under the current folder
    os.makedirs("models", exist_ok=True)
    x = np.load("input.npy")  # (B, H, W, C)
    config = None if config_text == "-" else json.loads(config_text)
    size = (x.shape[1], x.shape[2])
    torch.manual_seed(int(seed))
    net = registry.net_factory(network, x.shape[3], 0, config=config, size=size).eval()
    signature = get_signature((1, x.shape[3], *size), 0)
    rgb_stats = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    fs_ops.checkpoint_model(network, 0, net, signature, {}, rgb_stats, None, None, None, None)
    fs_ops.write_config(network, net, signature, rgb_stats)
    with torch.no_grad():
        emb = net.embedding(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    np.save("embedding.npy", emb.numpy())
    with open(f"models/{network}.json", encoding="utf-8") as f:
        json_keys = sorted(json.load(f))
    print(
        json.dumps(
            {
                "birder_version": __version__,
                "weights": f"models/{network}_0.pt",
                "config": f"models/{network}.json",
                "keys": sorted(net.state_dict())[:40],
                "json_keys": json_keys,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
