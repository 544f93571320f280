"""Tests of the demo corpus and the character-level transformer in conveyor.demo.charlm."""

from __future__ import annotations

import pytest
import torch

from conveyor.demo.charlm import (
    Block,
    CharDataset,
    Embedding,
    Head,
    char_transformer,
    generate,
    lm_loss,
    load_text,
)

SMALL = {"width": 32, "depth": 2, "heads": 2, "seq_len": 16}


@pytest.fixture(scope="module")
def text() -> str:
    return load_text()


@pytest.fixture(scope="module")
def train(text: str) -> CharDataset:
    return CharDataset(text, split="train")


def reset_all(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def test_packaged_text_is_at_least_100_kb_and_round_trips_through_the_codec(text: str, train: CharDataset) -> None:
    assert len(text.encode("utf-8")) >= 100_000
    assert train.decode(train.encode(text)) == text


def test_vocab_is_the_sorted_unique_characters_of_the_text(text: str, train: CharDataset) -> None:
    assert train.vocab == sorted(set(text))
    assert train.vocab_size == len(train.vocab)


def test_train_and_val_splits_are_a_deterministic_90_10_partition_of_the_text(text: str) -> None:
    first, again, val = CharDataset(text, "train"), CharDataset(text, "train"), CharDataset(text, "val")
    assert torch.equal(first.tokens, again.tokens)
    assert torch.equal(torch.cat([first.tokens, val.tokens]), first.encode(text))
    assert len(val) == pytest.approx(0.1 * len(text), abs=1)
    assert val.vocab == first.vocab


def test_batch_has_requested_shape_and_targets_are_inputs_shifted_by_one(train: CharDataset) -> None:
    inputs, targets = train.batch(8, 64, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (8, 64)
    assert inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row_in, row_target in zip(inputs, targets):
        window = train.decode(row_in) + train.decode(row_target[-1:])
        assert train.decode(row_target) == window[1:]


def test_batch_is_reproducible_from_the_generator_seed(train: CharDataset) -> None:
    a = train.batch(4, 32, torch.Generator().manual_seed(3))
    b = train.batch(4, 32, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_model_is_a_flat_sequential_of_embedding_blocks_and_head() -> None:
    model = char_transformer(61, **SMALL)
    assert [type(m) for m in model] == [Embedding, Block, Block, Head]


def test_model_maps_token_ids_to_vocab_logits_of_shape_b_t_v() -> None:
    torch.manual_seed(0)
    model = char_transformer(61, **SMALL)
    logits = model(torch.randint(0, 61, (3, 16)))
    assert logits.shape == (3, 16, 61)


def test_model_is_causal_changing_a_later_token_leaves_earlier_logits_unchanged() -> None:
    torch.manual_seed(0)
    model = char_transformer(61, **SMALL).eval()
    ids = torch.randint(0, 61, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 61
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_meta_built_model_materialised_with_to_empty_and_reset_parameters_gives_finite_outputs() -> None:
    with torch.device("meta"):
        model = char_transformer(61, **SMALL)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    reset_all(model)
    logits = model(torch.randint(0, 61, (2, 16)))
    assert torch.isfinite(logits).all()


def test_meta_materialisation_in_module_order_reproduces_the_eager_weights() -> None:
    torch.manual_seed(11)
    eager = char_transformer(61, **SMALL)
    with torch.device("meta"):
        lazy = char_transformer(61, **SMALL)
    lazy.to_empty(device="cpu")
    torch.manual_seed(11)
    reset_all(lazy)
    for (name, p), (_, q) in zip(eager.named_parameters(), lazy.named_parameters()):
        assert torch.equal(p, q), name


def test_initialisation_is_normal_002_weights_zero_biases_identity_layernorms() -> None:
    torch.manual_seed(0)
    model = char_transformer(61, width=128, depth=1, heads=4, seq_len=64)
    block = model[1]
    assert block.fc_weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model[0].token_weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(block.qkv_bias) == 0 and torch.count_nonzero(model[2].bias) == 0
    assert torch.all(block.ln1_weight == 1) and torch.all(model[2].ln_weight == 1)


def test_sixty_adamw_steps_lower_the_training_loss_by_half_a_nat(train: CharDataset) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = char_transformer(train.vocab_size, width=64, depth=2, heads=4, seq_len=64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        probe = train.batch(64, 64, torch.Generator().manual_seed(1))
        with torch.no_grad():
            initial = lm_loss(model(probe[0]), probe[1]).item()
        for _ in range(60):
            inputs, targets = train.batch(16, 64, generator)
            loss = lm_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            final = lm_loss(model(probe[0]), probe[1]).item()
    finally:
        torch.set_num_threads(threads)
    assert final <= initial - 0.5, (initial, final)


def test_generate_returns_prompt_plus_n_chars_from_the_vocab_and_restores_train_mode(train: CharDataset) -> None:
    torch.manual_seed(0)
    model = char_transformer(train.vocab_size, **SMALL).train()
    out = generate(model, train, "First Citizen:\n" * 3, 20, generator=torch.Generator().manual_seed(0))
    assert out.startswith("First Citizen:\n" * 3) and len(out) == 45 + 20
    assert set(out) <= set(train.vocab)
    assert model.training


def test_generate_with_zero_temperature_is_deterministic(train: CharDataset) -> None:
    torch.manual_seed(0)
    model = char_transformer(train.vocab_size, **SMALL)
    first = generate(model, train, "MENENIUS:", 10, temperature=0)
    assert first == generate(model, train, "MENENIUS:", 10, temperature=0)


def test_encode_rejects_characters_outside_the_vocab(train: CharDataset) -> None:
    with pytest.raises(ValueError, match="not in the vocabulary"):
        train.encode("\u00e9")
