import pytest
import torch

from common import data


def test_glove_reader_plain_and_header(tmp_path):
    f = tmp_path / "vec.txt"
    f.write_text("the 0.1 0.2 0.3\nof -1 2 3.5\n")
    words, vecs = data.load_glove(f)
    assert words == ["the", "of"] and vecs.shape == (2, 3) and vecs.dtype == torch.float64
    assert vecs[1, 2].item() == 3.5
    g = tmp_path / "w2v.txt"
    g.write_text("2 3\nthe 0.1 0.2 0.3\nof -1 2 3.5\n")
    assert torch.equal(data.load_glove(g)[1], vecs)
    assert data.load_glove(f, max_words=1)[0] == ["the"]


@pytest.mark.parametrize("content,message", [
    ("the 0.1 0.2\nof 1 2 3\n", r":2: expected 2 values after the word, got 3"),
    ("the 0.1 0.2\nof 1 x\n", r":2: not a number"),
    ("the 0.1 0.2\n\nof 1 2\n", r":2: empty line"),
    ("3 2\nthe 0.1 0.2\n", "announces 3 words, found 1"),
])
def test_glove_reader_bad_lines(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        data.load_glove(f)


def test_glove_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_glove(tmp_path / "none.txt")


def test_synthetic_shapes_determinism_and_structure():
    a = data.synthetic_qkv("clustered", 2, 3, 40, 50, 8, value_dim=4, seed=5)
    b = data.synthetic_qkv("clustered", 2, 3, 40, 50, 8, value_dim=4, seed=5)
    assert a.q.shape == (2, 3, 40, 8) and a.k.shape == (2, 3, 50, 8) and a.v.shape == (2, 3, 50, 4)
    assert torch.equal(a.k, b.k)
    # clustered keys: nearest-neighbour distances much smaller than between random gaussian keys
    g = data.synthetic_qkv("gaussian", 1, 1, 40, 200, 8, seed=5)
    c = data.synthetic_qkv("clustered", 1, 1, 40, 200, 8, seed=5)
    nn_dist = lambda k: torch.cdist(k[0, 0], k[0, 0]).fill_diagonal_(float("inf")).min(1).values.mean()
    assert nn_dist(c.k) < 0.5 * nn_dist(g.k)


def test_planted_key_is_argmax_and_sharpness_peaks():
    x = data.synthetic_qkv("planted", 1, 2, 30, 40, 16, dtype=torch.float64)
    scores = x.q @ x.k.transpose(-1, -2)
    assert torch.equal(scores.argmax(-1)[0, 1], data.planted_indices(30, 40))
    flat = data.synthetic_qkv("gaussian", 1, 1, 30, 30, 16, sharpness=0.01)
    peaked = data.synthetic_qkv("gaussian", 1, 1, 30, 30, 16, sharpness=10.0)
    entropy = lambda x: -(lambda w: (w * w.clamp_min(1e-30).log()).sum(-1).mean())(
        torch.softmax(x.q @ x.k.transpose(-1, -2) / 4, -1))
    assert entropy(peaked) < 1.0 < entropy(flat)


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="unknown kind"):
        data.synthetic_qkv("nope")
    with pytest.raises(ValueError, match="n_keys >= n_queries"):
        data.synthetic_qkv("planted", n_queries=10, n_keys=5)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        data.synthetic_qkv("gaussian", head_dim=0)


def test_input_sources_registered_by_name():
    assert {"gaussian", "clustered", "glove"} <= set(data.input_sources())
    assert "glove" not in data.input_sources(default_only=True)  # it needs a file from the user
    x = data.make_input("clustered", 24, data.InputSpec(heads=3, head_dim=8, seed=2, dtype=torch.float64))
    y = data.synthetic_qkv("clustered", 1, 3, 24, 24, 8, seed=2, dtype=torch.float64)
    assert torch.equal(x.q, y.q) and torch.equal(x.k, y.k) and torch.equal(x.v, y.v)
    with pytest.raises(ValueError, match="unknown input 'nope'; registered: .*gaussian"):
        data.make_input("nope", 8)
    with pytest.raises(ValueError, match="n must be a positive int"):
        data.make_input("gaussian", 0)


def test_register_source_adds_a_name_and_refuses_a_taken_one(monkeypatch):
    monkeypatch.setattr(data, "_SOURCES", dict(data._SOURCES))  # leave the real registry as it was

    def ones(n, spec):
        return data.QKV(*(torch.ones(1, spec.heads, n, spec.head_dim) for _ in range(3)), source="ones")

    data.register_source("ones", ones, in_default=False)
    data.register_source("ones", ones)  # the same function again (a module imported twice): allowed
    assert "ones" in data.input_sources() and data.make_input("ones", 5, data.InputSpec(heads=2)).q.shape == (1, 2, 5, 64)
    with pytest.raises(ValueError, match="already taken"):
        data.register_source("gaussian", ones)


def test_sources_of_other_packages_come_from_their_qkv_source_module():
    """common names no package above it: it imports every <package>/qkv_source.py beside it."""
    modules = sorted(p.parent.name for p in data.REPO_ROOT.glob(f"*/{data.SOURCE_MODULE}.py"))
    assert "common" not in modules
    names = data.input_sources()
    if "nanoGPT" in modules:
        assert "shakespeare" in names


def test_glove_source(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("".join(f"w{i} " + " ".join(str((i * 7 + j) % 5 - 2) for j in range(4)) + "\n" for i in range(40)))
    x = data.make_input("glove", 16, data.InputSpec(path=f))
    assert x.q.shape == (1, 1, 16, 4) and torch.equal(x.q, x.k) and not torch.equal(x.k, x.v)
    assert torch.equal(x.v[0, 0], data.load_glove(f)[1][16:32].float())
    with pytest.raises(ValueError, match="need 2n = 64"):
        data.make_input("glove", 32, data.InputSpec(path=f))
    with pytest.raises(ValueError, match="needs a GloVe-format text file"):
        data.make_input("glove", 16)
