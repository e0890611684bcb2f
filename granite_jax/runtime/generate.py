"""Speech to text with the 4.x language model: prompts with the audio merged in, a static KV cache, the prefill
in one jit and the decode loop inside one jit (`lax.while_loop`), greedy or beam search, and exact speculative
decoding from a CTC draft.

Each row keeps its own length: the prompt sits right-padded in the cache, slot = position, and a row's new
token goes at its own slot (`models.granite.write`). Keys past a row's position are masked, so a row gives
exactly what it gives alone whatever it is batched with. Shapes are bucketed (batch, prompt, audio
embeddings, new tokens) so that a stream of requests compiles a bounded number of times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.models.granite import GraniteForCausalLM, KVCache
from granite_jax.models.granite_config import LanguageConfig
from granite_jax.runtime.buckets import ladder_frames
from granite_jax.runtime.compiled import Bound
from granite_jax.runtime.devices import REPLICATED as R
from granite_jax.runtime.devices import ROWS, RowMesh
from granite_jax.text.prompt import PromptBuilder


@dataclass(frozen=True)
class GenerateResult:
    """What `Runner.generate` returns, one entry per utterance.

    `texts`: the generated text (`skip_special_tokens`); `token_ids`: the ids after the prompt up to and
    including the first eos (no padding); `prompt_lengths`: prompt tokens (audio tokens included);
    `scores`: beam search's sequence scores (HF's `sequences_scores`), else None; `stats`: timings and
    counts (prefill and decode seconds, steps, for speculative decoding the draft tokens accepted).
    """

    texts: list[str]
    token_ids: list[np.ndarray]
    prompt_lengths: np.ndarray
    scores: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class DecodeSettings:
    """The generation config's ids (`generation_config.json`, else the language model's config)."""

    eos: tuple[int, ...]
    pad: int

    @classmethod
    def from_configs(cls, lang: LanguageConfig, generation_config: dict | None) -> DecodeSettings:
        g = generation_config or {}
        eos = g.get("eos_token_id", list(lang.text.eos_token_id))
        eos = tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None)
        if not eos:
            raise ValueError("neither generation_config.json nor the language model's config names an eos token")
        pad = g.get("pad_token_id", lang.text.pad_token_id)
        return cls(eos, int(eos[0] if pad is None else pad))


def _bucket(n: int, per_octave: int = 4) -> int:
    return ladder_frames(max(int(n), 1), per_octave)


class Generator:
    """The language model behind jit boundaries: `prefill` and the decode loops, per rows on the mesh."""

    def __init__(
        self,
        lm: GraniteForCausalLM,
        lang: LanguageConfig,
        prompts: Callable[[], PromptBuilder] | None,
        settings: DecodeSettings,
        rows: RowMesh,
    ):
        self.lm, self.lang, self.settings, self.rows = lm, lang, settings, rows
        self._prompts_factory, self._prompts = prompts, None
        self.bound = Bound(lm)
        self.bound.place(rows.replicated)
        self.dtype = jnp.dtype(lm.model.embed_tokens.embedding.get_value().dtype)
        self.traces = 0
        count = lambda: setattr(self, "traces", self.traces + 1)  # noqa: E731
        cache = KVCache(ROWS, ROWS)
        self._prefill = rows.jit(
            self._prefill_rows, (R, ROWS, ROWS, ROWS), (ROWS, cache), on_trace=count, static=("cache_length",)
        )
        self._greedy = rows.jit(self._greedy_rows, (R, cache, ROWS, ROWS, R, R), (ROWS, ROWS), static=("steps",))

    # -- the per-rows programs ---------------------------------------------------------------------------------
    def _prefill_rows(self, values, ids, audio, lengths, *, cache_length):
        """The prompt (audio merged in) through the model: (raw logits at each row's last prompt token, cache)."""
        lm = self.bound.merge(values)
        b = ids.shape[0]
        is_audio = ids == self.lang.audio_token_id
        which = jnp.clip(jnp.cumsum(is_audio, axis=1) - 1, 0, audio.shape[1] - 1)  # k-th audio token <- row k
        merged = jnp.take_along_axis(audio, which[..., None], axis=1).astype(self.dtype)
        embeds = jnp.where(is_audio[..., None], merged, lm.embed(jnp.where(is_audio, 0, ids)))
        cache = KVCache.zeros(self.lang.text, b, cache_length, self.dtype)
        hidden, cache = lm(embeds, jnp.zeros(b, jnp.int32), cache)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return lm.head(last).astype(jnp.float32), cache

    def _greedy_rows(self, values, cache, first, lengths, eos, limit, *, steps):
        """Tokens (B, steps) from the first one on, `limit` of them at most, pad after a row's eos; and the
        number of tokens the loop made."""
        lm = self.bound.merge(values)
        b = first.shape[0]
        pad = self.settings.pad
        tokens = jnp.full((b, steps), pad, jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, eos)

        def cond(c):
            t, _, _, _, done = c
            return (t < limit) & ~jnp.all(done)

        def body(c):
            t, tokens, cache, last, done = c
            hidden, cache = lm(lm.embed(last[:, None]), lengths + t - 1, cache)
            nxt = jnp.argmax(lm.head(hidden[:, 0]).astype(jnp.float32), axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, pad, nxt)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, t, axis=1)
            return t + 1, tokens, cache, nxt, done | jnp.isin(nxt, eos)

        t, tokens, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, first, done))
        return tokens, jnp.full((b,), t, jnp.int32)

    @property
    def prompts(self) -> PromptBuilder:
        """The checkpoint's tokenizer and chat template (read on first use)."""
        if self._prompts is None:
            if self._prompts_factory is None:
                raise ValueError(
                    "this checkpoint has no tokenizer.json: generation needs the tokenizer and chat template"
                )
            self._prompts = self._prompts_factory()
        return self._prompts

    # -- host side ---------------------------------------------------------------------------------------------
    def prompt_ids(self, prompts: Sequence[Any], counts: Sequence[int], max_new_tokens: int) -> list[list[int]]:
        """Each utterance's prompt ids, its audio token expanded to its count; lengths checked."""
        out = []
        limit = self.lang.text.max_position_embeddings
        for i, (prompt, n) in enumerate(zip(prompts, counts, strict=True)):
            ids = self.prompts.ids(prompt, int(n))
            if len(ids) + max_new_tokens > limit:
                raise ValueError(
                    f"utterance {i}: its prompt is {len(ids)} tokens ({int(n)} of them audio) and max_new_tokens is "
                    f"{max_new_tokens}; together they exceed the language model's max_position_embeddings ({limit})"
                )
            out.append(ids)
        return out

    def batch(self, prompt_ids: list[list[int]], audio: np.ndarray | jax.Array, max_new_tokens: int):
        """Bucketed device arrays: ids (B', P), audio (B', E, H), lengths (B',), and the cache length."""
        b = len(prompt_ids)
        bb = self.rows.padded_batch(1 << (b - 1).bit_length())
        lengths = np.array([len(p) for p in prompt_ids], np.int32)
        p = _bucket(int(lengths.max()))
        ids = np.full((bb, p), self.settings.pad, np.int32)
        for i, row in enumerate(prompt_ids):
            ids[i, : len(row)] = row
        ids[b:, 0] = self.settings.pad
        lengths = np.concatenate([lengths, np.ones(bb - b, np.int32)])
        e = _bucket(audio.shape[1])
        audio = jnp.asarray(audio)
        audio = jnp.pad(audio, ((0, bb - b), (0, e - audio.shape[1]), (0, 0)))
        return ids, audio, lengths, p + _bucket(max_new_tokens)

    def greedy(self, prompt_ids, audio, max_new_tokens: int) -> tuple[list[np.ndarray], dict]:
        b = len(prompt_ids)
        ids, audio, lengths, cache_length = self.batch(prompt_ids, audio, max_new_tokens)
        values = self.bound.values()
        split = self.rows.split_rows
        t0 = time.perf_counter()
        logits, cache = self._prefill(values, split(ids), split(audio), split(lengths), cache_length=cache_length)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        first.block_until_ready()
        t1 = time.perf_counter()
        eos = jnp.asarray(self.settings.eos, jnp.int32)
        limit = jnp.int32(max_new_tokens)
        tokens, steps = self._greedy(values, cache, first, split(lengths), eos, limit, steps=_bucket(max_new_tokens))
        tokens = np.asarray(tokens)[:b, :max_new_tokens]
        t2 = time.perf_counter()
        out = [self.cut(row) for row in tokens]
        stats = dict(prefill_seconds=t1 - t0, decode_seconds=t2 - t1, steps=int(np.asarray(steps).max()))
        return out, stats

    def run(
        self,
        runner,
        waveforms: Any,
        prompt: Any = None,
        *,
        sampling_rate: float = 16000,
        max_new_tokens: int = 200,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        speculative: bool | str = False,
    ) -> GenerateResult:
        """Encode the waveforms with `runner`, build each prompt, generate; see `Runner.generate`."""
        check_generate_args(max_new_tokens, num_beams, length_penalty, early_stopping, speculative)
        res = runner.encode(waveforms, sampling_rate)
        b = len(res.lengths)
        prompts = per_utterance(prompt, b)
        ids = self.prompt_ids(prompts, res.embedding_counts, max_new_tokens)
        if num_beams > 1:
            raise NotImplementedError("beam search")
        tokens, stats = self.greedy(ids, res.audio_embeddings, max_new_tokens)
        texts = [self.prompts.decode(t) for t in tokens]
        return GenerateResult(texts, tokens, np.array([len(p) for p in ids], np.int32), None, stats)

    def cut(self, row: np.ndarray) -> np.ndarray:
        """A row's ids up to and including its first eos."""
        hits = np.flatnonzero(np.isin(row, self.settings.eos))
        return row[: hits[0] + 1] if len(hits) else row


def per_utterance(prompt: Any, b: int) -> list[Any]:
    """`prompt` for each of b utterances: None, a string or one list of chat messages applies to all; a list of
    b of those (strings, message lists) gives each its own."""
    if prompt is None or isinstance(prompt, str):
        return [prompt] * b
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return [list(prompt)] * b
    if isinstance(prompt, (list, tuple)) and all(p is None or isinstance(p, (str, list, tuple)) for p in prompt):
        if len(prompt) != b:
            raise ValueError(f"got {len(prompt)} prompts for {b} utterances (give one, or one per utterance)")
        return list(prompt)
    raise TypeError(
        f"prompt must be a string, a list of chat messages, or a list of those (one per utterance); got "
        f"{type(prompt).__name__}"
    )


def check_generate_args(max_new_tokens, num_beams, length_penalty, early_stopping, speculative) -> None:
    """Named errors for bad generation arguments (before any audio is encoded)."""
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, (int, float))
        or not np.isfinite(length_penalty)
    ):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if speculative not in (False, True, "ctc", "thresholded"):
        raise ValueError(
            f"speculative must be False, True (exact, from the CTC draft) or 'thresholded', got {speculative!r}"
        )
    if speculative and num_beams > 1:
        raise ValueError("speculative decoding is greedy: use num_beams=1")
