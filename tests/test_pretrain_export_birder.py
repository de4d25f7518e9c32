"""The encoder that pre-training exports is one birder loads: exported to a birder file, read by
``birder.load_model_with_cfg`` (strict), its embedding equals the trained state's, in birder and in ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.support.report import record
from tests.support.tiny_models import SIZE, TINY_HALF_WIDTH
from tests.support.tolerances import EMBEDDING_ATOL

ROOT = Path(__file__).resolve().parent.parent


def test_exported_encoder_loads_in_birder_with_the_trained_embedding(tmp_path: Path) -> None:
    from vitreg_jax.convert.verify import birder_embedding_from_files
    from vitreg_jax.model.build import model_from_checkpoint
    from vitreg_jax.pretraining.config import TrainConfig
    from vitreg_jax.pretraining.run import PretrainSettings, open_run, train

    settings = PretrainSettings(
        data=(str(ROOT / "examples" / "images"),),
        network="vit_reg4_b16",
        size=SIZE,
        aug_level=0,
        model_config=TINY_HALF_WIDTH,
        mae_config={"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
        train=TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, seed=0),
    )
    result = train(open_run(tmp_path / "run", settings))
    assert result.step == 3
    trained = result.model.encoder  # the trained state's encoder, as it is in memory after the last step

    weights = tmp_path / "exported" / "vit_reg4_b16_mae_3.pt"
    weights.parent.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitreg_jax",
            "export",
            str(tmp_path / "run" / "encoder"),
            "--out",
            str(weights),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    config = weights.with_name("vit_reg4_b16_mae.json")
    if not config.exists():  # the json sits beside the weights; its name follows the export's convention
        (config,) = weights.parent.glob("*.json")

    x = np.random.default_rng(5).standard_normal((3, *SIZE, 3)).astype(np.float32)
    ours = np.asarray(trained.embedding(x))
    theirs = birder_embedding_from_files(config, weights, x)
    diff = float(np.max(np.abs(ours - theirs)))
    record("pretrain export, tiny vit_reg4_b16, loaded by birder", "embedding", diff)
    assert diff <= EMBEDDING_ATOL, (
        f"birder's embedding of the exported encoder is {diff:.2e} from the trained one"
    )
    # the exported checkpoint itself holds the trained weights bit for bit
    exported, _ = model_from_checkpoint(tmp_path / "run" / "encoder")
    np.testing.assert_array_equal(np.asarray(exported.embedding(x)), ours)
