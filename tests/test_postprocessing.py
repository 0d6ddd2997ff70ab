import pytest
import torch

from handler.postprocessing import format_topk, topk_records

pytestmark = pytest.mark.unit
LABELS = ["a", "b", "c"]


def test_records_sorted_with_exact_values():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    out = topk_records(probs, LABELS, [2, 3])
    assert out[0] == [{"label": "b", "index": 1, "probability": pytest.approx(0.5)},
                      {"label": "c", "index": 2, "probability": pytest.approx(0.3)}]
    assert [r["index"] for r in out[1]] == [0, 2, 1]
    assert [r["label"] for r in out[1]] == ["a", "c", "b"]


def test_k_is_clamped_to_number_of_classes():
    out = topk_records(torch.tensor([[0.1, 0.7, 0.2]]), LABELS, [5])
    assert len(out[0]) == 3
    assert [r["label"] for r in out[0]] == ["b", "c", "a"]


def test_per_row_k_and_empty_batch():
    probs = torch.softmax(torch.randn(4, 3), 1)
    assert [len(r) for r in topk_records(probs, LABELS, [1, 2, 3, 10])] == [1, 2, 3, 3]
    assert topk_records(torch.empty(0, 3), LABELS, []) == []


@pytest.mark.parametrize("probs,labels,ks", [
    (torch.rand(2, 3), LABELS, [1]),          # ks length != B
    (torch.rand(1, 4), LABELS, [1]),          # C != labels
    (torch.rand(1, 3), LABELS, [0]),          # k < 1
])
def test_bad_arguments_raise(probs, labels, ks):
    with pytest.raises(ValueError):
        topk_records(probs, labels, ks)


def test_format_topk_table():
    text = format_topk([{"label": "forest", "index": 1, "probability": 0.91234}])
    lines = text.splitlines()
    assert lines[0].split() == ["rank", "label", "index", "probability"]
    assert lines[1].split() == ["1", "forest", "1", "0.9123"]
