"""Speech to text with the 4.x language model against transformers: the Granite LM's logits, greedy and beam
generation token for token (HF `generate`), batches of mixed audio and prompt lengths, both endings, tied and
untied heads, 1/2/4 kv heads, speculative decoding equal to greedy, the 3.x LoRA adapter (peft), bad input."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

import granite_jax
from granite_jax.testing import TINY, convert_cli, jit_call, rel_err

pytestmark = pytest.mark.torch
CFG = dataclasses.replace(TINY, input_dim=160, num_layers=2)
PROJECTOR = dict(window_size=6, downsample_rate=3)
VARIANTS = {  # name -> hf_speech_llm keyword arguments
    "tied_kv2": {},
    "untied_kv4": dict(tie=False, text=dict(num_key_value_heads=4, logits_scaling=1.0)),
    "kv1_scaled": dict(text=dict(num_key_value_heads=1, logits_scaling=2.5), seed=3),
}
MAX_NEW = 14
CONVERTED = {}  # name -> the converted directory behind `pairs(name)`


def _waves(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def tokenizer():
    from granite_jax.testing.hf_llm import train_llm_tokenizer

    return train_llm_tokenizer()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer):
    """name -> (HF model, HF processor, granite_jax Runner) through the real converter."""
    from granite_jax.testing.hf_llm import make_hf_speech_checkpoint

    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            model, proc = make_hf_speech_checkpoint(CFG, d / "hf", tokenizer, projector=PROJECTOR, **VARIANTS[name])
            convert_cli(d / "hf", d / "gj")
            CONVERTED[name] = d / "gj"
            cache[name] = (model, proc, granite_jax.load(d / "gj"))
        return cache[name]

    return get


# -- the language model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_times_transposed_is_the_product_in_each_of_its_forms(dtype):
    """One row, few rows (the weight as the left operand, behind a barrier) and many rows, with leading axes, under
    jit and grad: x @ weight.T, against float64 (bf16: within its rounding of the inputs, summed in fp32)."""
    import jax
    import jax.numpy as jnp

    from granite_jax.models.layers import SKINNY_ROWS, times_transposed

    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for rows in (1, 2, 9, SKINNY_ROWS, SKINNY_ROWS + 1):
        x = rng.standard_normal((rows, 1, 16)).astype(np.float32)
        out = jax.jit(lambda x, w: times_transposed(x, w, jnp.dtype(dtype)))(jnp.asarray(x), jnp.asarray(w))
        assert out.shape == (rows, 1, 24) and out.dtype == jnp.float32
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        assert rel_err(np.asarray(out, np.float64), want) < tol, rows
        loss = lambda x, w: jnp.sum(jnp.sin(times_transposed(x, w, jnp.float32)))  # noqa: E731
        gx, gw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
        gx_ref, gw_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w.T)), argnums=(0, 1))(
            jnp.asarray(x), jnp.asarray(w)
        )
        assert rel_err(gx, gx_ref) < 1e-5 and rel_err(gw, gw_ref) < 1e-5, rows


@pytest.mark.parametrize("name", list(VARIANTS))
def test_lm_logits_equal_granite_for_causal_lm(pairs, name):
    """Our logits (divided by logits_scaling) = GraniteForCausalLM's on the same inputs_embeds, in fp32."""
    import jax.numpy as jnp
    import torch
    import transformers

    model, _, runner = pairs(name)
    hf_lm = transformers.GraniteForCausalLM(model.config.text_config).eval()
    hf_lm.model.load_state_dict(model.model.language_model.state_dict())
    hf_lm.lm_head.load_state_dict(model.lm_head.state_dict())
    x = np.random.default_rng(1).standard_normal((2, 13, model.config.text_config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf_lm(inputs_embeds=torch.from_numpy(x)).logits.numpy()
    lm = runner.language_model
    hidden, _ = jit_call(lm)(jnp.asarray(x), jnp.zeros(2, jnp.int32))
    assert rel_err(jit_call(lm, "logits")(hidden), want) < 1e-4
    # the speech model's own forward applies lm_head without the division (transformers 5.24)
    with torch.no_grad():
        raw = model.lm_head(hf_lm.model(inputs_embeds=torch.from_numpy(x)).last_hidden_state).numpy()
    assert rel_err(jit_call(lm, "head")(hidden), raw) < 1e-4


def test_lm_weights_are_held_as_torch_holds_them_and_older_directories_still_load(pairs, tmp_path):
    """The dense layers' `weight` is torch's (out, in) tensor unchanged; a directory whose language model was
    written as `*.kernel` (in, out) loads to the same model (transposed on read)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from granite_jax.models.granite import lm_params_of

    model, _, runner = pairs("untied_kv4")
    ours = lm_params_of(runner.language_model)
    sd = model.state_dict()
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert np.array_equal(ours[key], sd[key.replace("model.", "model.language_model.", 1)].numpy())
    assert np.array_equal(ours["lm_head.weight"], sd["lm_head.weight"].numpy())
    old = tmp_path / "old"
    shutil.copytree(CONVERTED["untied_kv4"], old)
    dense = lambda k: k.endswith("_proj.weight") or k == "lm_head.weight"  # noqa: E731
    tensors = load_file(old / "language_model.safetensors")
    legacy = {
        (k.removesuffix("weight") + "kernel" if dense(k) else k): (np.ascontiguousarray(v.T) if dense(k) else v)
        for k, v in tensors.items()
    }
    assert any(k.endswith("q_proj.kernel") for k in legacy)
    save_file(legacy, old / "language_model.safetensors", metadata={"format": "granite_jax"})
    again = lm_params_of(granite_jax.load(old).language_model)
    assert set(again) == set(ours) and all(np.array_equal(again[k], ours[k]) for k in ours)


def test_token_embeddings_alias_a_map_of_the_file(pairs):
    """A loaded model's embedding table is a copy-on-write map of language_model.safetensors (the rows a run
    never looks up are never read: the released vocabulary is 100353 rows), also after generating; the other
    weights are arrays of their own. The parity tests run on such models. (An `nnx.jit` over the module, as the
    tests' `jit_call`, writes fresh arrays back into it.)"""
    import os

    pairs("untied_kv4")
    runner = granite_jax.load(CONVERTED["untied_kv4"])
    runner.generate(_waves(4000), max_new_tokens=3)
    path = os.path.realpath(CONVERTED["untied_kv4"] / "language_model.safetensors")
    with open("/proc/self/maps") as f:
        spans = [line.split()[0].split("-") for line in f if line.rstrip().endswith(path)]
    spans = [(int(lo, 16), int(hi, 16)) for lo, hi in spans]
    lm = runner.language_model
    mapped = lambda x: any(lo <= x.unsafe_buffer_pointer() < hi for lo, hi in spans)  # noqa: E731
    assert spans and mapped(lm.model.embed_tokens.embedding.get_value())
    assert not mapped(lm.lm_head.weight.get_value())
    assert not mapped(lm.model.layers[0].self_attn.q_proj.weight.get_value())


def test_lm_with_a_cache_equals_whole_sequences(pairs):
    """Prefill then one token at a time (per-row offsets) = the whole sequence at once."""
    import jax.numpy as jnp

    from granite_jax.models.granite import KVCache

    _, _, runner = pairs("tied_kv2")
    lm, cfg = jit_call(runner.language_model), runner.language_config.text
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, cfg.hidden_size)), jnp.float32)
    whole, _ = lm(x, jnp.zeros(2, jnp.int32))
    cache = KVCache.zeros(cfg, 2, 12, jnp.float32)
    part, cache = lm(x[:, :5], jnp.zeros(2, jnp.int32), cache)
    steps = [part]
    for t in range(5, 9):
        h, cache = lm(x[:, t : t + 1], jnp.full(2, t, jnp.int32), cache)
        steps.append(h)
    assert rel_err(jnp.concatenate(steps, axis=1), whole) < 1e-5


def test_greedy_and_speculative_loops_update_the_cache_in_place(pairs):
    """The decode loops take over prefill's KV cache (donated, handed back): XLA aliases it to the output, and
    the program holds a whole cache less (temporaries and outputs) than the same program without donation."""
    import jax
    import jax.numpy as jnp

    from granite_jax.models.granite import KVCache
    from granite_jax.runtime.devices import REPLICATED as R
    from granite_jax.runtime.devices import ROWS
    from granite_jax.runtime.generate import _bucket

    _, _, runner = pairs("tied_kv2")
    gen = runner._generator
    hidden = runner.language_config.text.hidden_size
    ids, audio, lengths, cache_length = gen.batch([[1] * 40] * 8, np.zeros((8, 3, hidden), np.float32), 400)
    values, split = gen.bound.values(), gen.rows.split_rows
    _, cache = gen._prefill(values, split(ids), split(audio), split(lengths), cache_length=cache_length)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    first, eos = jnp.zeros(len(lengths), jnp.int32), jnp.asarray(gen.settings.eos, jnp.int32)
    args = (values, cache, first, split(lengths), eos, split(gen.limits(8, len(lengths), 400)))
    drafts = split(np.full((len(lengths), 8), -1, np.int32))
    kv = KVCache(ROWS, ROWS)
    kept = {
        "greedy": gen.rows.jit(gen._greedy_rows, (R, kv, ROWS, ROWS, R, ROWS), (ROWS, ROWS, kv), static=("steps",)),
        "speculative": gen.rows.jit(
            gen._speculative_rows, (R, kv, ROWS, ROWS, R, ROWS, ROWS), (ROWS,) * 4 + (kv,), static=("steps", "chunk")
        ),
    }
    for name, donated, extra, static in (
        ("greedy", gen._greedy, (), dict(steps=_bucket(400))),
        ("speculative", gen._speculative, (drafts,), dict(steps=_bucket(400), chunk=8)),
    ):
        memory = donated.lower(*args, *extra, **static).compile().memory_analysis()
        copied = kept[name].lower(*args, *extra, **static).compile().memory_analysis()
        assert memory.alias_size_in_bytes >= cache_bytes, name
        assert copied.alias_size_in_bytes == 0, name
        held = [m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes for m in (memory, copied)]
        assert held[0] + cache_bytes <= held[1], (name, held, cache_bytes)


# -- greedy against transformers' generate --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_equals_hf_generate_for_each_utterance_of_a_mixed_batch(pairs, name):
    from granite_jax.testing.hf_llm import hf_generate

    model, proc, runner = pairs(name)
    waves = _waves(8000, 12517, 4801, 16000, seed=len(name))
    got = runner.generate(waves, max_new_tokens=MAX_NEW)
    assert len(got) == 4 and got.scores is None
    outputs = set()
    for w, ids, text in zip(waves, got.token_ids, got.texts, strict=True):
        want = hf_generate(model, proc, w, max_new_tokens=MAX_NEW)
        assert ids.tolist() == want
        assert text == proc.tokenizer.decode(want, skip_special_tokens=True)
        outputs.add(tuple(want))
    assert len(outputs) > 1, "the language model's text should depend on the audio"
    alone = runner.generate(waves[2], max_new_tokens=MAX_NEW)
    assert alone.token_ids[0].tolist() == got.token_ids[2].tolist()


def test_prompts_of_different_lengths_share_a_batch(pairs):
    from granite_jax.testing.hf_llm import AUDIO, hf_generate

    model, proc, runner = pairs("tied_kv2")
    waves = _waves(9000, 9000, 7000, seed=5)
    prompts = [None, "translate the speech into french please", "hello"]
    got = runner.generate(waves, prompts, max_new_tokens=MAX_NEW)
    assert len(set(got.prompt_lengths.tolist())) == 3
    for w, p, ids in zip(waves, prompts, got.token_ids, strict=True):
        assert ids.tolist() == hf_generate(model, proc, w, p, max_new_tokens=MAX_NEW)
    assert got.token_ids[0].tolist() != got.token_ids[1].tolist(), "the text should depend on the prompt"
    # a list of chat messages is taken verbatim
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": AUDIO + "hello"}]
    text = proc.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert runner._generator.prompts.render(chat) == text


def test_eos_and_max_new_tokens_endings(tmp_path, tokenizer):
    """An untied head whose eos and audio rows are boosted: some rows end at eos, others run to max_new_tokens,
    and some generate the audio token (which transformers embeds as token 0 when it feeds it back)."""
    import torch

    from granite_jax.testing.hf_llm import AUDIO, EOS, hf_generate, make_hf_speech_checkpoint

    model, proc = make_hf_speech_checkpoint(CFG, tmp_path / "hf", tokenizer, projector=PROJECTOR, tie=False, seed=9)
    eos, audio = tokenizer.token_to_id(EOS), tokenizer.token_to_id(AUDIO)
    with torch.no_grad():
        model.lm_head.weight[eos] *= 2.0
        model.lm_head.weight[audio] *= 3.0
    model.save_pretrained(tmp_path / "hf")
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    runner = granite_jax.load(tmp_path / "gj")
    waves = _waves(8000, 12000, 5000, 16000, 6400, 9600, seed=11)
    endings = {"eos": 0, "length": 0, "audio tokens": 0}
    for num_beams in (1, 2):
        got = runner.generate(waves, max_new_tokens=MAX_NEW, num_beams=num_beams)
        for w, ids in zip(waves, got.token_ids, strict=True):
            assert ids.tolist() == hf_generate(model, proc, w, max_new_tokens=MAX_NEW, num_beams=num_beams)
            endings["eos" if ids[-1] == eos else "length"] += 1
            endings["audio tokens"] += int((ids == audio).sum())
            assert eos not in ids[:-1].tolist() and (ids[-1] == eos or len(ids) == MAX_NEW)
    print(f"\nendings: {endings}")
    assert endings["eos"] >= 2 and endings["length"] >= 2 and endings["audio tokens"] >= 1, endings


# -- beam search ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_beams, length_penalty, early_stopping", [(2, 1.0, False), (3, 1.0, False), (3, 0.5, True), (2, 2.0, "never")]
)
def test_beam_search_equals_hf(pairs, num_beams, length_penalty, early_stopping):
    """Where transformers' beam scores agree with the model's definition (logits_scaling = 1)."""
    import torch

    from granite_jax.testing.hf_llm import AUDIO

    model, proc, runner = pairs("untied_kv4")
    waves = _waves(8000, 11000, 6000, seed=num_beams)
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    got = runner.generate(waves, max_new_tokens=MAX_NEW, **kw)
    chat = [{"role": "user", "content": AUDIO + "can you transcribe the speech into a written format?"}]
    text = proc.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for w, ids, score in zip(waves, got.token_ids, got.scores, strict=True):
        inputs = proc(text, w, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=MAX_NEW,
                output_scores=True,
                return_dict_in_generate=True,
                **kw,
            )
        want = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        eos = model.generation_config.eos_token_id
        want = want[: want.index(eos) + 1] if eos in want else want
        assert ids.tolist() == want
        assert abs(float(score) - float(out.sequences_scores[0])) < 1e-4


# -- speculative decoding -------------------------------------------------------------------------------------------
def test_speculative_equals_greedy_whatever_the_draft(pairs):
    _, _, runner = pairs("kv1_scaled")
    waves = _waves(8000, 12000, 5000, seed=13)
    gen = runner._generator
    greedy = runner.generate(waves, max_new_tokens=20)
    traces = gen.traces
    spec = runner.generate(waves, max_new_tokens=20, speculative=True)  # the CTC head's draft
    assert [t.tolist() for t in spec.token_ids] == [t.tolist() for t in greedy.token_ids]
    assert spec.texts == greedy.texts
    # greedy's prefill and cache are speculative's: a one-token speculative step is a greedy step to the bit
    assert gen.traces == traces
    res = runner.encode(waves)
    ids = gen.prompt_ids([None] * 3, res.embedding_counts, 20)
    perfect = [t.tolist() for t in greedy.token_ids]
    drafts = {
        "perfect": perfect,
        "wrong": [[5] * 25] * 3,
        "half": [d[:6] + [7, 7, 7] + d[9:] for d in perfect],
        "short": [d[:3] for d in perfect],
        "empty": [[], [], []],
        "one extra": [d[:5] + [7] + d[5:] for d in perfect],  # the draft out of step by one token, each way
        "one missing": [d[:5] + d[6:] for d in perfect],
    }
    steps, wide = {}, {}
    for name, draft in drafts.items():
        tokens, stats = gen.speculative(ids, res.audio_embeddings, 20, draft, chunk=4)
        assert [t.tolist() for t in tokens] == perfect, name
        steps[name], wide[name] = stats["steps"], stats["verify_steps"]
        assert all(a <= len(d) for a, d in zip(stats["accepted"], draft, strict=True)), name
    print("speculative passes (of them wide) per draft:", {k: (steps[k], wide[k]) for k in steps})
    assert steps["perfect"] < steps["half"] < steps["wrong"] == steps["empty"]
    # a draft that never agrees with the model costs greedy's passes and no wider ones
    assert wide["wrong"] == wide["empty"] == 0 and steps["wrong"] == max(len(p) for p in perfect) - 1
    # a draft one token out of step is found again: nearly the perfect draft's passes
    assert steps["one extra"] <= steps["perfect"] + 2 and steps["one missing"] <= steps["perfect"] + 2


# -- the 3.x LoRA adapter -------------------------------------------------------------------------------------------
def test_lora_adapter_equals_transformers_with_peft(tmp_path, tokenizer):
    """has_lora_adapter (3.x): transformers applies the q/v adapter whenever audio is given; so do we. The
    reference is the model with peft's LoRA layers injected (transformers 5.24's own adapter loading asks for a
    peft newer than PyPI has); the checkpoint holds the base weights and peft's adapter files."""
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    from granite_jax.testing.hf_llm import hf_generate, make_hf_speech_checkpoint

    model, proc = make_hf_speech_checkpoint(CFG, tmp_path / "hf", tokenizer, projector=PROJECTOR, seed=21)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["has_lora_adapter"] = True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    waves = _waves(8000, 11000, seed=23)
    plain = [hf_generate(model, proc, w, max_new_tokens=MAX_NEW) for w in waves]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = inject_adapter_in_model(lora, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B starts at zero: perturb both, strongly enough to change the text
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    state = get_peft_model_state_dict(model)
    save_file(
        {"base_model.model." + k: v.contiguous() for k, v in state.items()},
        tmp_path / "hf" / "adapter_model.safetensors",
    )
    adapter = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.to_dict().items()}
    (tmp_path / "hf" / "adapter_config.json").write_text(json.dumps(adapter, default=str))
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    runner = granite_jax.load(tmp_path / "gj")
    got = runner.generate(waves, max_new_tokens=MAX_NEW)
    for w, ids in zip(waves, got.token_ids, strict=True):
        assert ids.tolist() == hf_generate(model, proc, w, max_new_tokens=MAX_NEW)
    assert plain != [t.tolist() for t in got.token_ids], "the adapter should change the text"
    # without its adapter files, a 3.x checkpoint is refused by name
    os.remove(tmp_path / "gj" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="has_lora_adapter.*adapter_model.safetensors"):
        granite_jax.load(tmp_path / "gj")


# -- bf16 -----------------------------------------------------------------------------------------------------------
def test_bf16_logits_error_is_small(pairs, tmp_path):
    import jax.numpy as jnp

    _, _, full = pairs("tied_kv2")
    half = granite_jax.load(os.path.join(os.path.dirname(full.provenance["source"]), "gj"), dtype="bfloat16")
    x = np.random.default_rng(4).standard_normal((1, 20, full.language_config.text.hidden_size)).astype(np.float32)
    a, _ = jit_call(full.language_model)(jnp.asarray(x), jnp.zeros(1, jnp.int32))
    b, _ = jit_call(half.language_model)(jnp.asarray(x, jnp.bfloat16), jnp.zeros(1, jnp.int32))
    err = rel_err(jit_call(half.language_model, "logits")(b), jit_call(full.language_model, "logits")(a))
    print(f"\nbf16 language model logits, relative error against fp32: {err:.2e}")
    assert err < 5e-2


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_is_named(pairs, tmp_path):
    from granite_jax.testing.hf_llm import AUDIO

    _, _, runner = pairs("tied_kv2")
    w = _waves(8000)[0]
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(num_beams=0), "num_beams must be a positive integer"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(speculative="maybe"), "speculative must be"),
        (dict(speculative="thresholded"), "thresholded mode.*is not offered"),
        (dict(prompt=[{"role": "user", "content": "no audio here"}]), "holds 0 audio tokens"),
        (dict(prompt=AUDIO + "twice"), "holds 2 audio tokens"),
        (dict(prompt=["a", "b"]), "2 prompts for 1 utterances"),
        (dict(prompt=42), "prompt must be"),
        (dict(max_new_tokens=10_000), "max_position_embeddings"),
    ]
    for kwargs, match in cases:
        prompt = kwargs.pop("prompt", None)
        with pytest.raises((ValueError, TypeError), match=match):
            runner.generate(w, prompt, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        runner.generate(np.zeros(0, np.float32))
    # a bare encoder asked to generate is told to convert the whole model
    convert_cli(runner.provenance["source"], tmp_path / "enc", "--encoder-only")
    with pytest.raises(ValueError, match="convert the whole 4.x checkpoint"):
        granite_jax.load(tmp_path / "enc").generate(w)


# -- conversion and export ------------------------------------------------------------------------------------------
def test_conversion_carries_the_prompt_files_and_is_strict(pairs, tmp_path):
    from safetensors.numpy import load_file, save_file

    model, _, runner = pairs("untied_kv4")
    src = runner.provenance["source"]
    files = set(os.listdir(os.path.join(os.path.dirname(src), "gj")))
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "language_config.json"} <= files
    with open(os.path.join(os.path.dirname(src), "gj", "language_config.json")) as f:
        lang = json.load(f)
    assert lang["text_config"]["tie_word_embeddings"] is False
    # an unmapped language model tensor is refused by name
    import shutil

    shutil.copytree(src, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["language_model.model.layers.0.self_attn.rotary.weight"] = np.zeros(3, np.float32)
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    from granite_jax.convert.cli import main

    assert main([str(tmp_path / "hf"), str(tmp_path / "bad"), "--quiet"]) == 1
    assert not (tmp_path / "bad").exists()
    del model


def test_export_round_trip_is_bit_exact(pairs, tmp_path):
    from granite_jax.checkpoint.safetensors_file import SafetensorsFile

    _, _, runner = pairs("untied_kv4")
    src = runner.provenance["source"]
    granite_jax.export_hf(granite_jax.load(os.path.join(os.path.dirname(src), "gj")), tmp_path / "out", base=src)
    a, b = (
        SafetensorsFile(os.path.join(src, "model.safetensors")),
        SafetensorsFile(tmp_path / "out" / "model.safetensors"),
    )
    assert set(a) == set(b) and any(k.startswith("language_model.") for k in a)
    assert "language_model.lm_head.weight" in a
    assert all(a.get_tensor(k).tobytes() == b.get_tensor(k).tobytes() for k in a)


def test_transcribe_command_generates(pairs, tmp_path):
    import soundfile

    from granite_jax.cli.main import main

    _, _, runner = pairs("tied_kv2")
    ckpt = os.path.join(os.path.dirname(runner.provenance["source"]), "gj")
    waves = _waves(8000, 12000, seed=31)
    for i, w in enumerate(waves):
        soundfile.write(tmp_path / f"{i}.wav", w, 16000)
    files = [str(tmp_path / f"{i}.wav") for i in range(2)]
    for extra in ([], ["--num-beams", "2"], ["--speculative"], ["--prompt", "hello"]):
        kw = dict(num_beams=2) if extra[:1] == ["--num-beams"] else {}
        prompt = "hello" if extra[:1] == ["--prompt"] else None
        want = runner.generate(waves, prompt, max_new_tokens=9, **kw).texts
        out = tmp_path / "o.jsonl"
        argv = ["transcribe", ckpt, *files, "--out", str(out), "--max-new-tokens", "9", "--overwrite", "--quiet"]
        assert main(argv + extra) == 0
        assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == want, extra
    assert runner.transcribe(files) == runner.generate(waves).texts  # transcribe on 4.x: the model's text
    srt = tmp_path / "o.srt"
    assert main(["transcribe", ckpt, files[0], "--out", str(srt), "--quiet"]) == 1 and not srt.exists()
    assert main(["transcribe", ckpt, files[0], "--num-beams", "0", "--quiet"]) == 1


@pytest.mark.slow
def test_production_lm_widths_with_two_layers():
    """The released language model's widths (hidden 2048, 16 heads / 4 kv heads, SwiGLU 8192, vocabulary 100353,
    Granite's multipliers) with 2 layers: logits against GraniteForCausalLM, whole and through the cache."""
    import jax.numpy as jnp
    import torch
    import transformers

    from granite_jax.convert.key_map import LM_KEYS, hf_to_flax
    from granite_jax.models.granite import KVCache, abstract_lm_params, lm_from_params
    from granite_jax.models.granite_config import GraniteConfig
    from granite_jax.testing.hf import perturb_
    from granite_jax.testing.hf_llm import RELEASED_TEXT

    hf_cfg = transformers.GraniteConfig(
        **dict(RELEASED_TEXT, num_hidden_layers=2),
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0},
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    ref = transformers.GraniteForCausalLM(hf_cfg).eval()
    perturb_(ref, seed=1)
    cfg = GraniteConfig.from_hf_config(hf_cfg.to_dict())
    state = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    expected = {k: (v.shape, np.dtype(np.float32)) for k, v in abstract_lm_params(cfg).items()}
    module = lm_from_params(cfg, hf_to_flax(state, state.__getitem__, expected, table=LM_KEYS))
    lm, logits = jit_call(module), jit_call(module, "logits")
    del state
    x = np.random.default_rng(0).standard_normal((2, 21, 2048)).astype(np.float32)
    with torch.no_grad():
        want = ref(inputs_embeds=torch.from_numpy(x)).logits.numpy()
    hidden, _ = lm(jnp.asarray(x), jnp.zeros(2, jnp.int32))
    assert rel_err(logits(hidden), want) < 1e-4
    cache = KVCache.zeros(cfg, 2, 24, jnp.float32)
    first, cache = lm(jnp.asarray(x[:, :17]), jnp.zeros(2, jnp.int32), cache)
    rest = []
    for t in range(17, 21):
        h, cache = lm(jnp.asarray(x[:, t : t + 1]), jnp.full(2, t, jnp.int32), cache)
        rest.append(h)
    assert rel_err(logits(jnp.concatenate([first, *rest], axis=1)), want) < 1e-4
