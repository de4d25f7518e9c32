"""The knn command (vitreg_jax.evaluation.neighbours.knn_to_parquet) on embed-like folders of both formats."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.embed_folders import write_npy_folder, write_parquet_folder
from tests.support.tolerances import SEARCH_SCORE_ATOL
from vitreg_jax.cli.main import main


def data(n: int, dim: int = 16, seed: int = 0, prefix: str = "img") -> tuple[list[str], np.ndarray]:
    keys = [f"{prefix}/{i:04d}.jpg" for i in range(n)]
    return keys, np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def brute_force(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 cosine, ordered by (-score, row)."""
    q = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    x = index / np.linalg.norm(index.astype(np.float64), axis=1, keepdims=True)
    scores = q @ x.T  # (Q, N)
    order = np.stack([np.lexsort((np.arange(len(s)), -s)) for s in scores])[:, :k]  # (Q, k)
    return np.take_along_axis(scores, order, axis=1), order


def run_knn(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["knn", *argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_table(path) -> dict[str, list]:
    table = pq.read_table(path)
    assert table.column_names == ["query", "rank", "key", "score"]
    assert [str(t) for t in table.schema.types] == ["string", "int32", "string", "float"]
    return table.to_pydict()


def test_index_equal_to_queries_gives_each_query_itself_with_score_one(tmp_path, capsys):
    keys, values = data(150, 768)
    folder = write_parquet_folder(tmp_path / "e", keys, values, [60, 0, 90], row_group=16)
    code, out, err = run_knn(
        capsys,
        "--index",
        str(folder),
        "--queries",
        str(folder),
        "-k",
        "3",
        "--out",
        str(tmp_path / "nn.parquet"),
        "--block-rows",
        "64",
    )
    assert code == 0, err
    assert "150 queries x 150 index rows, k=3" in out
    table = read_table(tmp_path / "nn.parquet")
    assert table["query"] == [k for k in keys for _ in range(3)] and table["rank"] == [1, 2, 3] * 150
    assert table["key"][::3] == keys
    np.testing.assert_allclose(table["score"][::3], 1.0, rtol=0, atol=SEARCH_SCORE_ATOL)


@pytest.mark.parametrize("index_format", ["npy", "parquet"])
def test_equals_brute_force_across_formats(tmp_path, capsys, index_format):
    index_keys, index = data(203, seed=1, prefix="index")
    query_keys, queries = data(17, seed=2, prefix="query")
    if index_format == "npy":
        index_dir = write_npy_folder(tmp_path / "index", index_keys, index)
    else:
        index_dir = write_parquet_folder(tmp_path / "index", index_keys, index, [100, 103])
    query_dir = write_parquet_folder(tmp_path / "queries", query_keys, queries, [9, 8])
    code, _, err = run_knn(
        capsys,
        "--index",
        str(index_dir),
        "--queries",
        str(query_dir),
        "-k",
        "5",
        "--out",
        str(tmp_path / "nn.parquet"),
        "--block-rows",
        "32",
    )
    assert code == 0, err
    table = read_table(tmp_path / "nn.parquet")
    ref_scores, ref_rows = brute_force(queries, index, 5)
    assert table["query"] == [k for k in query_keys for _ in range(5)]
    assert table["key"] == [index_keys[r] for r in ref_rows.reshape(-1)]
    np.testing.assert_allclose(table["score"], ref_scores.reshape(-1), rtol=0, atol=SEARCH_SCORE_ATOL)


def test_errors_are_one_line_with_exit_2_and_no_output(tmp_path, capsys):
    keys, values = data(4)
    good = write_npy_folder(tmp_path / "good", keys, values)
    other_dim = write_npy_folder(tmp_path / "d8", *data(4, dim=8))
    empty = write_parquet_folder(tmp_path / "empty", [], np.zeros((0, 16), np.float32), [])
    tokens = write_npy_folder(tmp_path / "tokens", keys, np.zeros((4, 2, 16), np.float32))
    existing = tmp_path / "exists.parquet"
    existing.write_bytes(b"user's file")
    out = str(tmp_path / "nn.parquet")
    cases = [
        (["--index", str(tmp_path / "nope"), "--queries", str(good), "--out", out], "no such folder"),
        (
            ["--index", str(good), "--queries", str(other_dim), "--out", out],
            "16-d embeddings, the queries 8-d",
        ),
        (["--index", str(good), "--queries", str(good), "-k", "0", "--out", out], "k must be a positive"),
        (["--index", str(empty), "--queries", str(good), "--out", out], "holds no embeddings"),
        (
            ["--index", str(good), "--queries", str(good), "-k", "5", "--out", out],
            r"k=5 is larger than the index",
        ),
        (["--index", str(tokens), "--queries", str(good), "--out", out], "per-token features"),
        (
            ["--index", str(good), "--queries", str(good), "--out", str(existing)],
            "already exists (pass --force",
        ),
        (
            ["--index", str(good), "--queries", str(good), "--out", str(tmp_path / "no" / "x.parquet")],
            "no such",
        ),
        (["--index", str(good), "--queries", str(good), "--out", out, "--block-rows", "0"], "--block-rows"),
    ]
    for argv, message in cases:
        code, _, err = run_knn(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("vitreg-jax knn: error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "nn.parquet").exists()
    assert existing.read_bytes() == b"user's file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_force_replaces_an_existing_table(tmp_path, capsys):
    keys = [f"k{i}" for i in range(6)]
    values = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    emb = write_npy_folder(tmp_path / "emb", keys, values)
    out = tmp_path / "nn.parquet"
    out.write_bytes(b"an older table")
    argv = ["--index", str(emb), "--queries", str(emb), "-k", "2", "--out", str(out)]
    assert run_knn(capsys, *argv)[0] == 2 and out.read_bytes() == b"an older table"
    assert run_knn(capsys, *argv, "--force")[0] == 0
    table = read_table(out)
    assert (
        len(table["query"]) == 12 and table["query"][0] == table["key"][0] == "k0"
    )  # each query finds itself


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["knn", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--index DIR" in text and "--queries DIR" in text and "rank" in text


def test_the_parser_does_not_import_jax_and_quotes_the_library_default():
    import subprocess
    import sys

    code = (
        "import sys; from vitreg_jax.cli.main import build_parser; build_parser('knn'); "
        "print('jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from vitreg_jax.cli import knn
    from vitreg_jax.evaluation.search import DEFAULT_INDEX_BLOCK

    assert knn.DEFAULT_INDEX_BLOCK == DEFAULT_INDEX_BLOCK


def test_parts_rewritten_with_other_types_are_one_line(tmp_path, capsys):
    """Parts rewritten by another tool (int keys, string or ragged embeddings, nulls, no embedding column)
    gave five different tracebacks; each is one line naming the part."""
    keys = [f"k{i}" for i in range(4)]
    values = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    good = write_parquet_folder(tmp_path / "good", keys, values, [4])
    rows = [list(map(float, v)) for v in values]
    variants = {
        "int keys": pa.table({"key": [1, 2, 3, 4], "source": ["s"] * 4, "embedding": rows}),
        "string embeddings": pa.table({"key": keys, "source": ["s"] * 4, "embedding": ["x"] * 4}),
        "ragged embeddings": pa.table(
            {"key": keys, "source": ["s"] * 4, "embedding": [r[: 4 + i] for i, r in enumerate(rows)]}
        ),
        "null embeddings": pa.table(
            {
                "key": keys,
                "source": ["s"] * 4,
                "embedding": pa.array([*rows[:3], None], pa.list_(pa.float32(), 8)),
            }
        ),
        "no embedding column": pa.table({"key": keys, "source": ["s"] * 4}),
    }
    for what, table in variants.items():
        folder = tmp_path / what.replace(" ", "-")
        write_parquet_folder(folder, keys, values, [4])
        pq.write_table(table, folder / "part-00000.parquet")
        for index, queries in ((folder, good), (good, folder)):
            code, _, err = run_knn(
                capsys,
                "--index",
                str(index),
                "--queries",
                str(queries),
                "-k",
                "2",
                "--out",
                str(tmp_path / "nn.parquet"),
            )
            assert code == 2 and err.count("\n") == 1 and "part-00000.parquet" in err, (what, err)
        assert not (tmp_path / "nn.parquet").exists()
