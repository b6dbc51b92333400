"""Emergent neuron sets: statistics, selection, ablation, composition ops, files.

References here are independent of the code under test: brute force over every captured
activation, a direct transcription of LAPE's published ``identify.py``, the step-wise AP
definition written as loops, and weights edited by hand in a copy of the model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from composer.emergent import (
    NeuronFile,
    NeuronStatistics,
    ablate_neurons,
    ablated,
    average_precision,
    collect_statistics,
    ffn_output_projections,
    load_neuron_set,
    mean_loss,
    neuron_axis,
    random_like,
    restrict_delta,
    restrict_lora,
    save_neuron_set,
    scale_neurons,
    select_average_precision,
    select_lape,
    select_neurons,
    selection,
    verify_neuron_sets,
)
from composer.errors import InvalidParams, InvalidTensorFile, UnknownMethod

VOCAB = 128
WIDTH = 96  # intermediate size of the tiny Llama


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """A random Llama: hidden 64, 2 layers, intermediate 96, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def _batch(seed: int, texts: int, length: int, pad_from: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; row ``i`` is right-padded from position ``pad_from[i]`` on."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (texts, length), generator=generator)
    mask = torch.ones(texts, length, dtype=torch.bool)
    for row, start in enumerate(pad_from or []):
        mask[row, start:] = False
        ids[row, start:] = 0
    return ids, mask


def _captured(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Every down_proj input of one forward pass, by layer."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(model.model.layers):
        handles.append(
            block.mlp.down_proj.register_forward_pre_hook(
                lambda _m, inputs, layer=layer: seen.__setitem__(layer, inputs[0].detach().clone())
            )
        )
    with torch.no_grad():
        model(input_ids=batch[0], attention_mask=batch[1].long())
    for handle in handles:
        handle.remove()
    return seen


# -- statistics -----------------------------------------------------------------------------


def test_statistics_equal_brute_force_over_all_activations(llama: torch.nn.Module) -> None:
    probes = {
        "a": [_batch(1, 3, 10, pad_from=[10, 6, 3]), _batch(2, 2, 7)],
        "b": [_batch(3, 4, 9, pad_from=[9, 9, 2, 5])],
    }
    stats = collect_statistics(llama, probes)

    assert stats.functions == ("a", "b") and stats.layers == (0, 1)
    text_means, text_function = [], []
    for f, batches in enumerate(probes.values()):
        positive = torch.zeros(2, WIDTH, dtype=torch.int64)
        abs_sum = torch.zeros(2, WIDTH, dtype=torch.float64)
        tokens = 0
        for ids, mask in batches:
            acts = _captured(llama, (ids, mask))
            for row in range(ids.shape[0]):
                per_layer = []
                for layer in range(2):
                    real = [acts[layer][row, t] for t in range(ids.shape[1]) if mask[row, t]]
                    for value in real:
                        positive[layer] += (value > 0).long()
                        abs_sum[layer] += value.abs().double()
                    per_layer.append(torch.stack(real).abs().mean(dim=0))
                tokens += int(mask[row].sum())
                text_means.append(torch.stack(per_layer))
                text_function.append(f)
        assert int(stats.tokens[f]) == tokens
        assert torch.equal(stats.positive[f], positive)
        torch.testing.assert_close(stats.abs_sum[f], abs_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.text_mean_abs, torch.stack(text_means), rtol=1e-5, atol=1e-6)
    assert stats.text_function.tolist() == text_function
    # the counts are not degenerate: some neurons are on, some off, on some token
    p = stats.activation_probability()
    assert float(p.min()) > 0 or float(p.max()) < 1


def test_statistics_size_does_not_grow_with_tokens(llama: torch.nn.Module) -> None:
    short = collect_statistics(llama, {"a": [_batch(1, 2, 4)], "b": [_batch(2, 2, 4)]})
    long = collect_statistics(llama, {"a": [_batch(1, 2, 64)] * 3, "b": [_batch(2, 2, 128)]})
    assert int(long.tokens.sum()) == 40 * int(short.tokens.sum())
    counts_only = collect_statistics(llama, {"a": [_batch(1, 2, 64)] * 3, "b": [_batch(2, 2, 128)]}, per_text=False)
    tiny_counts = collect_statistics(llama, {"a": [_batch(1, 2, 4)], "b": [_batch(2, 2, 4)]}, per_text=False)
    assert counts_only.nbytes() == tiny_counts.nbytes() == 2 * 2 * WIDTH * 16 + 2 * 8
    # per-text means grow with the number of texts only: 8 texts vs 4, same length or not
    assert long.nbytes() - counts_only.nbytes() == 8 * 2 * WIDTH * 4 + 8 * 8
    assert short.nbytes() - tiny_counts.nbytes() == 4 * 2 * WIDTH * 4 + 4 * 8


def test_hooks_are_removed_when_progress_cancels(llama: torch.nn.Module) -> None:
    class Cancelled(Exception):
        pass

    def cancel(_name: str, _tokens: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        collect_statistics(llama, {"a": [_batch(1, 2, 4)] * 2}, progress=cancel)
    assert all(not m._forward_pre_hooks for m in ffn_output_projections(llama).values())


def test_gpt2_mlp_projection_is_found_and_attention_projection_is_not() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    projections = ffn_output_projections(model)
    assert projections == {0: model.transformer.h[0].mlp.c_proj, 1: model.transformer.h[1].mlp.c_proj}
    stats = collect_statistics(model, {"a": [_batch(1, 2, 5)], "b": [_batch(2, 1, 5)]})
    assert stats.positive.shape == (2, 2, 128) and stats.tokens.tolist() == [10, 5]


# -- selection ------------------------------------------------------------------------------


def _stats_from_p(p: torch.Tensor, tokens: int = 1000) -> NeuronStatistics:
    """Statistics whose activation probabilities are exactly ``p`` ([F, L, I], multiples of 1/tokens)."""
    functions, layers, width = p.shape
    return NeuronStatistics(
        functions=tuple(f"f{i}" for i in range(functions)),
        layers=tuple(range(layers)),
        tokens=torch.full((functions,), tokens, dtype=torch.int64),
        positive=(p * tokens).round().to(torch.int64),
        abs_sum=torch.zeros(p.shape, dtype=torch.float64),
        text_mean_abs=torch.zeros(0, layers, width),
        text_function=torch.zeros(0, dtype=torch.int64),
    )


def test_lape_finds_the_planted_specific_neurons() -> None:
    generator = torch.Generator().manual_seed(5)
    # background: every function fires 20-30% of the time (near-uniform, high entropy)
    p = 0.2 + 0.1 * torch.rand(3, 2, 50, generator=generator)
    p[:, 0, 3] = torch.tensor([0.9, 0.05, 0.05])  # f0 only
    p[:, 1, 7] = torch.tensor([0.02, 0.95, 0.02])  # f1 only
    p[:, 1, 20] = torch.tensor([0.85, 0.01, 0.88])  # f0 and f2
    p[:, 0, 10] = torch.tensor([0.1, 0.0, 0.0])  # entropy 0, but never often active: filtered out
    sets = select_lape(_stats_from_p(p), top_rate=0.03)
    as_lists = {f: {layer: i.tolist() for layer, i in s.items()} for f, s in sets.items()}
    assert as_lists == {"f0": {0: [3], 1: [20]}, "f1": {0: [], 1: [7]}, "f2": {0: [], 1: [20]}}


def _lape_reference(over_zero: torch.Tensor, n: torch.Tensor, top_rate: float) -> list[set[tuple[int, int]]]:
    """The authors' identify.py, transcribed (layer x inter x lang layout, topk on entropy)."""
    activation_probs = over_zero / n
    normed = activation_probs / activation_probs.sum(dim=-1, keepdim=True)
    normed[torch.isnan(normed)] = 0
    log_probs = torch.where(normed > 0, normed.log(), 0)
    entropy = -torch.sum(normed * log_probs, dim=-1)
    flattened_probs = activation_probs.flatten()
    top_prob_value = flattened_probs.kthvalue(round(len(flattened_probs) * 0.95)).values.item()
    top_position = (activation_probs > top_prob_value).sum(dim=-1)
    entropy[top_position == 0] = torch.inf
    flattened_entropy = entropy.flatten()
    _, index = flattened_entropy.topk(round(len(flattened_entropy) * top_rate), largest=False)
    row_index, col_index = index // entropy.size(1), index % entropy.size(1)
    selected_probs = activation_probs[row_index, col_index].transpose(0, 1)
    activation_bar = flattened_probs.kthvalue(round(len(flattened_probs) * 0.95)).values.item()
    result: list[set[tuple[int, int]]] = [set() for _ in range(over_zero.shape[-1])]
    for lang, i in zip(*torch.where(selected_probs > activation_bar), strict=True):
        result[int(lang)].add((int(row_index[i]), int(col_index[i])))
    return result


@pytest.mark.parametrize("top_rate", [0.01, 0.05])
def test_lape_matches_the_published_code_on_random_statistics(top_rate: float) -> None:
    generator = torch.Generator().manual_seed(9)
    tokens = torch.tensor([700, 1000, 1300, 900])
    positive = (torch.rand(4, 3, 400, generator=generator) ** 3 * tokens.view(-1, 1, 1)).round().long()
    stats = _stats_from_p(torch.zeros(4, 3, 400))
    stats = NeuronStatistics(**{**stats.__dict__, "tokens": tokens, "positive": positive})
    expected = _lape_reference(positive.permute(1, 2, 0).float(), tokens.float(), top_rate)
    sets = select_lape(stats, top_rate=top_rate)
    got = [{(layer, int(i)) for layer, index in sets[f"f{f}"].items() for i in index} for f in range(4)]
    assert got == expected
    assert sum(map(len, got)) >= round(1200 * top_rate) // 2


def _ap_loops(scores: list[float], labels: list[bool]) -> float:
    """Step-wise AP over distinct thresholds, written out."""
    positives = sum(labels)
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        above = [label for score, label in zip(scores, labels, strict=True) if score >= threshold]
        recall = sum(above) / positives
        ap += (recall - previous_recall) * sum(above) / len(above)
        previous_recall = recall
    return ap


def test_average_precision_by_hand_and_against_loops_with_ties() -> None:
    by_hand = average_precision(torch.tensor([[0.9], [0.8], [0.7], [0.6]]), torch.tensor([True, False, True, False]))
    assert float(by_hand) == pytest.approx((1 / 1 + 2 / 3) / 2)
    generator = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (30, 40), generator=generator).float()  # many ties
    labels = torch.rand(30, generator=generator) < 0.3
    got = average_precision(scores, labels)
    for column in range(40):
        assert float(got[column]) == pytest.approx(_ap_loops(scores[:, column].tolist(), labels.tolist()), abs=1e-12)


def test_average_precision_selection_finds_the_planted_neurons(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(4)
    texts, layers, width = 24, 2, 20
    text_function = torch.arange(texts) % 3
    means = torch.rand(texts, layers, width, generator=generator)
    planted = {0: [(0, 5), (1, 11)], 1: [(0, 0), (0, 19)], 2: [(1, 2), (1, 3)]}
    for f, neurons in planted.items():
        for layer, i in neurons:
            means[:, layer, i] = torch.where(text_function == f, 2.0 + means[:, layer, i], means[:, layer, i])
    stats = NeuronStatistics(
        functions=("f0", "f1", "f2"),
        layers=(0, 1),
        tokens=torch.full((3,), 100),
        positive=torch.zeros(3, layers, width, dtype=torch.int64),
        abs_sum=torch.zeros(3, layers, width, dtype=torch.float64),
        text_mean_abs=means,
        text_function=text_function,
    )
    sets = select_average_precision(stats, top_fraction=0.05)  # 2 of 40 neurons per function
    for f, neurons in planted.items():
        assert {(layer, int(i)) for layer, index in sets[f"f{f}"].items() for i in index} == set(neurons)
    monkeypatch.setattr(selection, "AP_BLOCK_ELEMENTS", 24 * 7)  # blocks of 7 neurons, the last one short
    blocked = select_average_precision(stats, top_fraction=0.2)
    monkeypatch.undo()
    whole = select_average_precision(stats, top_fraction=0.2)
    assert all(torch.equal(blocked[f][layer], whole[f][layer]) for f in whole for layer in whole[f])


def test_select_neurons_validates_method_and_params() -> None:
    stats = _stats_from_p(0.2 + 0.1 * torch.rand(2, 1, 100, generator=torch.Generator().manual_seed(1)))
    sets, used = select_neurons(stats, "lape", {"top_rate": 0.02})
    assert used == {"top_rate": 0.02, "filter_rate": 0.95, "activation_bar_ratio": 0.95}
    assert set(sets) == {"f0", "f1"}
    with pytest.raises(UnknownMethod):
        select_neurons(stats, "magic")
    with pytest.raises(InvalidParams) as error:
        select_neurons(stats, "average_precision", {"top_fraction": 2.0, "extra": 1})
    assert len(error.value.problems) == 2
    with pytest.raises(InvalidParams):  # no per-text statistics
        select_neurons(stats, "average_precision")


# -- ablation and verification --------------------------------------------------------------


def _neurons() -> dict[int, torch.Tensor]:
    return {0: torch.tensor([1, 5, 40, 95]), 1: torch.tensor([0, 17])}


def test_ablation_hook_equals_zeroed_down_proj_columns_and_leaves_the_model_unchanged(llama: torch.nn.Module) -> None:
    ids = _batch(7, 2, 12)[0]
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with torch.no_grad():
        original = llama(input_ids=ids).logits
    edited = copy.deepcopy(llama)
    for layer, index in _neurons().items():
        edited.model.layers[layer].mlp.down_proj.weight.data[:, index] = 0.0
    with torch.no_grad():
        expected = edited(input_ids=ids).logits
        with ablated(llama, _neurons()):
            hooked = llama(input_ids=ids).logits
        after = llama(input_ids=ids).logits
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, original, atol=1e-4)
    assert torch.equal(after, original)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_weight_ops_equal_the_hook(llama: torch.nn.Module) -> None:
    ids = _batch(8, 2, 12)[0]
    for factor in (0.0, 0.5, -1.0):
        edited = copy.deepcopy(llama)
        for layer, index in _neurons().items():
            proj = edited.model.layers[layer].mlp.down_proj
            new = (
                ablate_neurons(proj.weight.data, index)
                if factor == 0
                else scale_neurons(proj.weight.data, index, factor)
            )
            proj.weight.data = new
        with torch.no_grad(), ablated(llama, _neurons(), factor=factor):
            hooked = llama(input_ids=ids).logits
        with torch.no_grad():
            torch.testing.assert_close(edited(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-5)


def test_scale_neurons_on_a_conv1d_layout_scales_rows() -> None:
    weight = torch.randn(8, 3)  # in x out (GPT-2 c_proj)
    index = torch.tensor([2, 6])
    expected = weight.clone()
    expected[index] *= 3.0
    torch.testing.assert_close(scale_neurons(weight, index, 3.0, fan_in_fan_out=True), expected)
    with pytest.raises(InvalidParams):
        scale_neurons(weight, torch.tensor([8]), 0.0, fan_in_fan_out=True)


def test_random_like_matches_sizes_and_is_seeded() -> None:
    drawn = random_like(_neurons(), WIDTH, seed=3)
    assert {k: v.numel() for k, v in drawn.items()} == {0: 4, 1: 2}
    assert all(v.unique().numel() == v.numel() and int(v.max()) < WIDTH for v in drawn.values())
    assert all(
        torch.equal(a, b) for a, b in zip(drawn.values(), random_like(_neurons(), WIDTH, 3).values(), strict=True)
    )
    assert not torch.equal(drawn[0], random_like(_neurons(), WIDTH, 4)[0])


def test_verification_table(llama: torch.nn.Module) -> None:
    held_out = {"a": [_batch(11, 2, 10)], "b": [_batch(12, 2, 10, pad_from=[10, 4])]}
    sets = {"a": _neurons(), "b": {0: torch.tensor([], dtype=torch.int64), 1: torch.tensor([], dtype=torch.int64)}}
    table = verify_neuron_sets(llama, held_out, sets, seed=1)
    assert set(table.loss) == {"a", "random:a", "b", "random:b"}
    assert table.sizes == {"a": 6, "random:a": 6, "b": 0, "random:b": 0}
    increase = table.relative_increase()
    assert increase["b"] == {"a": 0.0, "b": 0.0}  # nothing ablated
    with ablated(llama, _neurons()):
        ablated_loss = mean_loss(llama, held_out["a"])
    assert table.loss["a"]["a"] == pytest.approx(ablated_loss)
    assert increase["a"]["a"] == pytest.approx((ablated_loss - table.base_loss["a"]) / table.base_loss["a"])
    # a random model's loss is about log(vocab)
    assert table.base_loss["a"] == pytest.approx(math.log(VOCAB), rel=0.1)
    assert table.to_dict()["relative_increase"] == increase


def test_mean_loss_ignores_padding(llama: torch.nn.Module) -> None:
    ids, mask = _batch(13, 2, 10, pad_from=[10, 6])
    separate = [ids[0:1], ids[1:2, :6]]
    per_token = [mean_loss(llama, [t]) for t in separate]
    expected = (per_token[0] * 9 + per_token[1] * 5) / 14
    assert mean_loss(llama, [(ids, mask)]) == pytest.approx(expected, rel=1e-5)


# -- LoRA restriction -----------------------------------------------------------------------


@pytest.mark.parametrize(("axis", "shape"), [("out", (96, 64)), ("in", (64, 96))])
def test_restrict_lora_equals_the_masked_dense_delta(axis: str, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(4, shape[1], generator=generator)
    b = torch.randn(shape[0], 4, generator=generator)
    keep = torch.tensor([3, 10, 11, 90])
    dense = b @ a
    expected = torch.zeros_like(dense)
    if axis == "out":
        expected[keep] = dense[keep]
    else:
        expected[:, keep] = dense[:, keep]
    a2, b2 = restrict_lora(a, b, keep, axis=axis)  # type: ignore[arg-type]
    assert a2.shape == a.shape and b2.shape == b.shape
    torch.testing.assert_close(b2 @ a2, expected)
    torch.testing.assert_close(restrict_delta(dense, keep, axis=axis), expected)  # type: ignore[arg-type]
    torch.testing.assert_close(restrict_delta(dense.T, keep, axis=axis, fan_in_fan_out=True), expected.T)  # type: ignore[arg-type]


def test_neuron_axis_of_module_names() -> None:
    assert neuron_axis("model.layers.3.mlp.up_proj") == (3, "out")
    assert neuron_axis("base_model.model.model.layers.0.mlp.gate_proj") == (0, "out")
    assert neuron_axis("model.layers.12.mlp.down_proj") == (12, "in")
    assert neuron_axis("transformer.h.1.mlp.c_fc") == (1, "out")
    assert neuron_axis("transformer.h.1.mlp.c_proj") == (1, "in")
    assert neuron_axis("transformer.h.1.attn.c_proj") is None
    assert neuron_axis("model.layers.3.self_attn.o_proj") is None


# -- files ----------------------------------------------------------------------------------


def test_neuron_file_round_trip_and_refusals(tmp_path: Path) -> None:
    entry = NeuronFile(
        neurons={1: torch.tensor([9, 2, 2]), 0: torch.tensor([4])},
        function="code",
        method="lape",
        params={"top_rate": 0.01},
        probe_hashes={"code": "ab" * 32},
    )
    loaded = load_neuron_set(save_neuron_set(tmp_path / "set.safetensors", entry))
    assert {k: v.tolist() for k, v in loaded.neurons.items()} == {0: [4], 1: [2, 9]}
    assert (loaded.function, loaded.method, loaded.params, loaded.probe_hashes) == (
        "code",
        "lape",
        {"top_rate": 0.01},
        {"code": "ab" * 32},
    )
    assert loaded.size == 3
    from safetensors.torch import save_file

    save_file({"layers.0": torch.tensor([1.0])}, str(tmp_path / "bad.safetensors"), metadata={"format": "x"})
    with pytest.raises(InvalidTensorFile) as error:
        load_neuron_set(tmp_path / "bad.safetensors")
    assert len(error.value.problems) == 2
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InvalidTensorFile):
        load_neuron_set(tmp_path / "junk.safetensors")


def test_specificity_is_own_over_mean_other_increase() -> None:
    from composer.emergent import VerificationTable

    base = {"a": 2.0, "b": 1.0, "c": 4.0}
    table = VerificationTable(
        base_loss=base,
        loss={
            "a": {"a": 4.0, "b": 1.1, "c": 4.4},  # +100%; others +10%, +10%
            "b": {"a": 1.8, "b": 1.5, "c": 4.0},  # others fall on average: ratio is meaningless
            "c": {"a": 2.0, "b": 0.9, "c": 3.0},  # nothing rises
        },
        sizes={"a": 1, "b": 1, "c": 1},
    )
    assert table.specificity("a") == pytest.approx(10.0)
    assert table.specificity("b") == math.inf
    assert table.specificity("c") == 0.0
