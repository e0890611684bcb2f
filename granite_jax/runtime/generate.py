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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.models.granite import GraniteForCausalLM, KVCache
from granite_jax.models.granite_config import LanguageConfig
from granite_jax.runtime.buckets import ladder_frames
from granite_jax.runtime.compiled import Bound
from granite_jax.runtime.devices import REPLICATED as R
from granite_jax.runtime.devices import ROWS, RowMesh
from granite_jax.text.ctc import collapse
from granite_jax.text.prompt import PromptBuilder


@dataclass(frozen=True)
class GenerateResult:
    """What `Runner.generate` returns, one entry per utterance.

    `texts`: the generated text (`skip_special_tokens`); `token_ids`: the ids after the prompt up to and
    including the first eos (no padding); `prompt_lengths`: prompt tokens (audio tokens included);
    `scores`: beam search's sequence scores (HF's `sequences_scores`), else None; `stats`: timings and
    counts (prefill and decode seconds, steps; for speculative decoding also the wide verification steps among
    them, `verify_steps`, and the draft tokens accepted).
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


CHUNK = 8  # draft tokens a speculative pass verifies


def _bucket(n: int, per_octave: int = 4) -> int:
    """The padded size compiled for `n`: 4 per doubling (new tokens, audio embeddings) is coarse enough for sizes
    that cost little when padded; the prompt, whose padding the prefill computes through every layer, takes 8."""
    return ladder_frames(max(int(n), 1), per_octave)


class Language(NamedTuple):
    """A whole 4.x checkpoint's language side, as `load` hands it to the Runner."""

    model: GraniteForCausalLM
    config: LanguageConfig
    prompts: Callable[[], PromptBuilder] | None  # builds the prompt builder (when first needed)
    generation_config: dict | None
    bpe_head: tuple[np.ndarray, np.ndarray] | None = None  # 4.1's out_llm (weight (V + 1, hidden), bias)


class Generator:
    """The language model behind jit boundaries: `prefill` and the decode loops, per rows on the mesh."""

    @classmethod
    def from_language(cls, language: Language, rows: RowMesh) -> Generator:
        settings = DecodeSettings.from_configs(language.config, language.generation_config)
        return cls(language.model, language.config, language.prompts, settings, rows, language.bpe_head)

    def __init__(
        self,
        lm: GraniteForCausalLM,
        lang: LanguageConfig,
        prompts: Callable[[], PromptBuilder] | None,
        settings: DecodeSettings,
        rows: RowMesh,
        bpe_head: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.lm, self.lang, self.settings, self.rows = lm, lang, settings, rows
        self._prompts_factory, self._prompts = prompts, None
        self._bpe_head = bpe_head
        self.bound = Bound(lm)
        self.bound.place(rows.replicated)
        self.dtype = jnp.dtype(lm.model.embed_tokens.embedding.get_value().dtype)
        self.traces = 0
        count = lambda: setattr(self, "traces", self.traces + 1)  # noqa: E731
        cache = KVCache(ROWS, ROWS)
        # greedy's and speculative's loops take over the cache prefill made (argument 1) and hand it back, so that
        # XLA updates it in place rather than holding a copy (beam search widens it to B x beams)
        self._prefill = rows.jit(
            self._prefill_rows, (R, ROWS, ROWS, ROWS), (ROWS, cache), on_trace=count, static=("cache_length",)
        )
        self._beam = rows.jit(
            self._beam_rows,
            (R, cache, ROWS, ROWS, R, ROWS),
            (ROWS, ROWS),
            static=("steps", "num_beams", "length_penalty", "early_stopping"),
        )
        self._speculative = rows.jit(
            self._speculative_rows,
            (R, cache, ROWS, ROWS, R, ROWS, ROWS),
            (ROWS, ROWS, ROWS, ROWS, cache),
            static=("steps", "chunk"),
            donate=(1,),
        )
        self._greedy = rows.jit(
            self._greedy_rows, (R, cache, ROWS, ROWS, R, ROWS), (ROWS, ROWS, cache), static=("steps",), donate=(1,)
        )

    # -- the per-rows programs ---------------------------------------------------------------------------------
    def _embed(self, lm, ids):
        """Generated tokens' embeddings. A generated audio token is embedded as token 0, as transformers does
        (its forward maps every `audio_token_id` to 0 before the lookup; only the prompt's get audio)."""
        return lm.embed(jnp.where(ids == self.lang.audio_token_id, 0, ids))

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
        """Tokens (B, steps) from the first one on, `limit` of them at most, pad after a row's eos; the number
        of tokens the loop made; the cache (donated, handed back)."""
        lm = self.bound.merge(values)
        b = first.shape[0]
        pad = self.settings.pad
        tokens = jnp.full((b, steps), pad, jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, eos) | (limit <= 1)

        def cond(c):
            return ~jnp.all(c[4])

        def body(c):
            t, tokens, cache, last, done = c
            hidden, cache = lm(self._embed(lm, last[:, None]), lengths + t - 1, cache)
            nxt = jnp.argmax(lm.head(hidden[:, 0]).astype(jnp.float32), axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, pad, nxt)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, t, axis=1)
            return t + 1, tokens, cache, nxt, done | jnp.isin(nxt, eos) | (t + 1 >= limit)

        t, tokens, cache, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, first, done))
        return tokens, jnp.full((b,), t, jnp.int32), cache

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

    def _beam_rows(
        self, values, cache, logits, lengths, eos, limit, *, steps, num_beams, length_penalty, early_stopping
    ):
        """transformers' vectorised beam search (`GenerationMixin._beam_search`), step for step: (best sequence
        (B, steps), its score (B,)). `logits`: the prefill's, one row per utterance (raw: `head`)."""
        lm = self.bound.merge(values)
        cfg = self.lang.text
        b, nb, v = logits.shape[0], num_beams, logits.shape[-1]
        k = max(2, 1 + len(self.settings.eos)) * nb  # beams_to_keep
        top_mask = jnp.arange(k) < nb
        neg = jnp.float32(-1.0e9)
        active, limit = limit > 0, jnp.max(limit)  # padding rows take no part (finished, nothing to improve)
        pos0 = jnp.repeat(lengths, nb)  # (B * nb,) each beam's first new position
        cache = jax.tree.map(lambda c: jnp.repeat(c, nb, axis=0), cache)
        fill = self.settings.pad

        def log_probs(raw):  # the model's logits (divided by logits_scaling), as scores
            return jax.nn.log_softmax(raw.astype(jnp.float32) / cfg.logits_scaling, axis=-1)

        def select(state, logp):
            """One step of selection at generated length t (transformers' three helpers)."""
            t, run_seq, run_scores, seq, scores, finished, unsatisfied, cache = state
            acc = (logp.reshape(b, nb, v) + run_scores[..., None]).reshape(b, nb * v)
            top_lp, top_idx = jax.lax.top_k(acc, k)
            origin, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
            top_seq = jnp.take_along_axis(run_seq, origin[..., None], axis=1)
            top_seq = jax.lax.dynamic_update_index_in_dim(top_seq, tok, t, axis=2)
            hits = jnp.isin(tok, eos) | (t + 1 >= limit)
            # the running beams for the next step: the best nb candidates that did not stop
            keep = jax.lax.top_k(top_lp + hits * neg, nb)[1]
            new_run_seq = jnp.take_along_axis(top_seq, keep[..., None], axis=1)
            new_run_scores = jnp.take_along_axis(top_lp + hits * neg, keep, axis=1)
            new_origin = jnp.take_along_axis(origin, keep, axis=1)
            # finished hypotheses: merge those that just stopped (among the top nb) with the kept ones
            just = hits & top_mask[None, :]
            cand = top_lp / ((t + 1).astype(jnp.float32) ** length_penalty)
            full = jnp.all(finished, axis=-1, keepdims=True) & (early_stopping is True)
            cand = cand + full * neg + (~unsatisfied)[:, None] * neg + (~just) * neg
            m_seq = jnp.concatenate([seq, top_seq], axis=1)
            m_scores = jnp.concatenate([scores, cand], axis=1)
            m_fin = jnp.concatenate([finished, just], axis=1)
            best = jax.lax.top_k(m_scores, nb)[1]
            seq = jnp.take_along_axis(m_seq, best[..., None], axis=1)
            scores = jnp.take_along_axis(m_scores, best, axis=1)
            finished = jnp.take_along_axis(m_fin, best, axis=1)
            # reorder the cache to the running beams' origins
            rows = (jnp.arange(b)[:, None] * nb + new_origin).reshape(-1)
            cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=0), cache)
            t = t + 1
            # early-stop heuristic
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = limit.astype(jnp.float32)
            else:
                best_len = t.astype(jnp.float32)
            best_running = new_run_scores[:, :1] / best_len**length_penalty
            worst_done = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), neg)
            unsatisfied = unsatisfied & jnp.any(best_running > worst_done, axis=-1)
            go = jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits)
            return (t, new_run_seq, new_run_scores, seq, scores, finished, unsatisfied, cache), go

        run_seq = jnp.full((b, nb, steps), fill, jnp.int32)
        run_scores = jnp.where(jnp.arange(nb) == 0, 0.0, neg)[None].repeat(b, 0).astype(jnp.float32)
        state = (
            jnp.int32(0),
            run_seq,
            run_scores,
            run_seq,
            jnp.full((b, nb), neg, jnp.float32),
            jnp.repeat(~active[:, None], nb, axis=1),
            active,
            cache,
        )
        first = jnp.repeat(log_probs(logits), nb, axis=0)
        state, go = select(state, first)

        def body(c):
            state, _ = c
            t, run_seq = state[0], state[1]
            last = run_seq[:, :, t - 1].reshape(-1)
            hidden, cache = lm(self._embed(lm, last[:, None]), pos0 + t - 1, state[7])
            return select((*state[:7], cache), log_probs(lm.head(hidden[:, 0])))

        state, _ = jax.lax.while_loop(lambda c: c[1] & (c[0][0] < limit), body, (state, go))
        return state[3][:, 0], state[4][:, 0]

    def _speculative_rows(self, values, cache, first, lengths, eos, limit, drafts, *, steps, chunk):
        """Greedy decoding that verifies the draft (B, D; -1 past a row's draft) wherever it agrees with the model.

        Each row keeps a pointer into its draft, moved on to just past the model's last token when that token
        lies in the draft's next `chunk` tokens (the row is then in step with its draft). A pass feeds each row
        its last token and, when some row is in step, the next `chunk` draft tokens too: it keeps the longest
        draft prefix equal to the model's own argmax and the model's token after it. While no row is in step a
        pass feeds the last token alone, a greedy step, so a draft that is wrong costs no wider passes (on CPU a
        pass over `chunk` + 1 tokens takes about twice as long as one over one token). The tokens are
        greedy's by construction. Returns (tokens (B, steps), tokens emitted per row, draft tokens accepted per
        row, [passes, of them wide] per row, the cache)."""
        lm = self.bound.merge(values)
        b = first.shape[0]
        pad = self.settings.pad
        width = steps + chunk + 1
        tokens = jnp.full((b, width), pad, jnp.int32).at[:, 0].set(first)
        rows = jnp.arange(b)[:, None]

        def window(start, n):
            """(b, n): each row's draft tokens from `start` on, -1 past its end."""
            idx = start[:, None] + jnp.arange(n)[None, :]
            inside = idx < drafts.shape[1]
            return jnp.where(inside, jnp.take_along_axis(drafts, jnp.minimum(idx, drafts.shape[1] - 1), axis=1), -1)

        def resync(pointer, last):
            """(pointer, in step): past `last`'s first place among the next `chunk` draft tokens, if it is there."""
            hit = window(pointer, chunk) == last[:, None]
            found = jnp.any(hit, axis=1)
            return jnp.where(found, pointer + jnp.argmax(hit, axis=1) + 1, pointer), found

        def advance(c, k: int):
            """One pass feeding each row's last token and its next k - 1 draft tokens."""
            t, tokens, cache, last, done, pointer, accepted, passes, synced = c
            props = window(pointer, k - 1)
            inputs = jnp.concatenate([last[:, None], jnp.where(props < 0, pad, props)], axis=1)
            hidden, cache = lm(self._embed(lm, inputs), lengths + t - 1, cache)
            g = jnp.argmax(lm.head(hidden).astype(jnp.float32), axis=-1).astype(jnp.int32)  # (b, k)
            m = jnp.sum(jnp.cumprod(props == g[:, : k - 1], axis=1), axis=1)  # draft tokens accepted
            offsets = jnp.arange(k)[None, :]
            n = m + 1  # tokens emitted: the accepted draft, then the model's own
            hit = jnp.isin(g, eos) & (offsets < n[:, None])
            first_eos = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, n)
            n = jnp.where(done, 0, jnp.minimum(jnp.minimum(n, first_eos), limit - t))
            write = offsets < n[:, None]
            tokens = tokens.at[rows, jnp.where(write, t[:, None] + offsets, width)].set(g, mode="drop")
            last = jnp.where(n > 0, jnp.take_along_axis(g, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0], last)
            pointer, synced = resync(pointer + jnp.minimum(m, n), last)
            t = t + n
            done = done | jnp.any(hit & write, axis=1) | (t >= limit)
            passes = passes + jnp.array([1, int(k > 1)], jnp.int32)
            return t, tokens, cache, last, done, pointer, accepted + jnp.minimum(m, n), passes, synced

        def some_in_step(c):
            return jnp.any(c[8] & ~c[4])

        def greedy_until_in_step(c):
            return jax.lax.while_loop(lambda c: ~jnp.all(c[4]) & ~some_in_step(c), lambda c: advance(c, 1), c)

        def verify_while_in_step(c):
            return jax.lax.while_loop(some_in_step, lambda c: advance(c, chunk + 1), c)

        done = jnp.isin(first, eos) | (limit <= 1)
        pointer, synced = resync(jnp.zeros(b, jnp.int32), first)
        zeros = jnp.zeros(b, jnp.int32)
        init = (jnp.ones(b, jnp.int32), tokens, cache, first, done, pointer, zeros, jnp.zeros(2, jnp.int32), synced)
        out = jax.lax.while_loop(
            lambda c: ~jnp.all(c[4]), lambda c: verify_while_in_step(greedy_until_in_step(c)), init
        )
        t, tokens, cache, _, _, _, accepted, passes, _ = out
        return tokens[:, :steps], t, accepted, jnp.broadcast_to(passes, (b, 2)), cache

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
        p = _bucket(int(lengths.max()), per_octave=8)  # at most 12.5% of the prefill's rows padding
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
        # the speculative loop's cache length: its one-token steps are then these steps, summed in the same order
        ids, audio, lengths, cache_length = self.batch(prompt_ids, audio, max_new_tokens + CHUNK + 1)
        values = self.bound.values()
        split = self.rows.split_rows
        t0 = time.perf_counter()
        logits, cache = self._prefill(values, split(ids), split(audio), split(lengths), cache_length=cache_length)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        first.block_until_ready()
        t1 = time.perf_counter()
        eos = jnp.asarray(self.settings.eos, jnp.int32)
        limit = split(self.limits(b, len(lengths), max_new_tokens))
        tokens, steps, _ = self._greedy(values, cache, first, split(lengths), eos, limit, steps=_bucket(max_new_tokens))
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
        speculative: bool = False,
    ) -> GenerateResult:
        """Encode the waveforms with `runner`, build each prompt, generate; see `Runner.generate`."""
        check_generate_args(max_new_tokens, num_beams, length_penalty, early_stopping, speculative)
        res = runner.encode(waveforms, sampling_rate)
        b = len(res.lengths)
        prompts = per_utterance(prompt, b)
        ids = self.prompt_ids(prompts, res.embedding_counts, max_new_tokens)
        scores = None
        if num_beams > 1:
            tokens, scores, stats = self.beam(
                ids, res.audio_embeddings, max_new_tokens, num_beams, float(length_penalty), early_stopping
            )
        elif speculative:
            drafts = self.drafts(runner, res)
            tokens, stats = self.speculative(ids, res.audio_embeddings, max_new_tokens, drafts)
        else:
            tokens, stats = self.greedy(ids, res.audio_embeddings, max_new_tokens)
        texts = [self.prompts.decode(t) for t in tokens]
        return GenerateResult(texts, tokens, np.array([len(p) for p in ids], np.int32), scores, stats)

    def beam(self, prompt_ids, audio, max_new_tokens, num_beams, length_penalty, early_stopping):
        b = len(prompt_ids)
        ids, audio, lengths, cache_length = self.batch(prompt_ids, audio, max_new_tokens)
        values, split = self.bound.values(), self.rows.split_rows
        t0 = time.perf_counter()
        logits, cache = self._prefill(values, split(ids), split(audio), split(lengths), cache_length=cache_length)
        logits.block_until_ready()
        t1 = time.perf_counter()
        eos = jnp.asarray(self.settings.eos, jnp.int32)
        seq, score = self._beam(
            values,
            cache,
            logits,
            split(lengths),
            eos,
            split(self.limits(b, len(lengths), max_new_tokens)),
            steps=_bucket(max_new_tokens),
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        seq, score = np.asarray(seq)[:b, :max_new_tokens], np.asarray(score)[:b]
        stats = dict(prefill_seconds=t1 - t0, decode_seconds=time.perf_counter() - t1)
        return [self.cut(row) for row in seq], score, stats

    def speculative(self, prompt_ids, audio, max_new_tokens, drafts: list[list[int]], chunk: int = CHUNK):
        """Greedy tokens, verified `chunk` draft tokens at a time (see `_speculative_rows`)."""
        b = len(prompt_ids)
        ids, audio, lengths, cache_length = self.batch(prompt_ids, audio, max_new_tokens + chunk + 1)
        values, split = self.bound.values(), self.rows.split_rows
        t0 = time.perf_counter()
        logits, cache = self._prefill(values, split(ids), split(audio), split(lengths), cache_length=cache_length)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        first.block_until_ready()
        t1 = time.perf_counter()
        # one table width per new-token bucket whatever the drafts' lengths (a longer draft is never read past)
        width = _bucket(max_new_tokens + chunk)
        drafts = [list(d[:width]) for d in drafts]
        table = np.full((len(lengths), width), -1, np.int32)
        for i, d in enumerate(drafts):
            table[i, : len(d)] = d
        eos = jnp.asarray(self.settings.eos, jnp.int32)
        tokens, emitted, accepted, passes, _ = self._speculative(
            values,
            cache,
            first,
            split(lengths),
            eos,
            split(self.limits(b, len(lengths), max_new_tokens)),
            split(table),
            steps=_bucket(max_new_tokens),
            chunk=chunk,
        )
        tokens = np.asarray(tokens)[:b, :max_new_tokens]
        t2 = time.perf_counter()
        emitted, accepted = np.asarray(emitted)[:b], np.asarray(accepted)[:b]
        passes = np.asarray(passes).max(axis=0)  # the slowest device's loop
        stats = dict(
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1,
            steps=int(passes[0]),
            verify_steps=int(passes[1]),
            draft_tokens=[len(d) for d in drafts],
            accepted=accepted.tolist(),
            acceptance=float(accepted.sum() / max(1, sum(len(d) for d in drafts))),
        )
        return [self.cut(row) for row in tokens], stats

    def drafts(self, runner, res) -> list[list[int]]:
        """Each utterance's draft: the encoder's CTC text in the language model's tokens. With 4.1's BPE head
        (`out_llm.safetensors`) its greedy ids (label i is token i - 1); else the character head's text,
        tokenized. Either way stripped and re-tokenized as open_asr_leaderboard's speculative script does."""
        if self._bpe_head is not None:
            texts = self._bpe_drafts(runner, res)
        else:
            texts = runner.ctc_greedy(res.hidden_states, res.lengths)
        enc = self.prompts.tokenizer.encode
        return [enc(t.strip(), add_special_tokens=False).ids if t.strip() else [] for t in texts]

    def _bpe_drafts(self, runner, res) -> list[str]:
        """4.1's BPE CTC head on the final hidden states pooled in windows of 4, each frame weighted by the
        character head's non-blank probability (the leaderboard weighs by the mid layer's; only the draft's
        quality, never the output, depends on it)."""
        w, bias = self._bpe_head
        h = jnp.asarray(res.hidden_states)[..., -w.shape[1] :]
        importance = 1.0 - jax.nn.softmax(runner.ctc_logits(res.hidden_states).astype(jnp.float32), axis=-1)[..., 0]
        b, t, d = h.shape
        pad = -t % 4
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, 4, d)
        importance = jnp.pad(importance, ((0, 0), (0, pad))).reshape(b, -1, 4)
        weights = importance / (importance.sum(-1, keepdims=True) + 1e-8)
        pooled = jnp.einsum("bnwd,bnw->bnd", h.astype(jnp.float32), weights)  # (b, windows, hidden)
        ids = np.asarray(jnp.argmax(pooled @ jnp.asarray(w).T + jnp.asarray(bias), axis=-1))
        out = []
        for row, n in zip(ids, -(-np.asarray(res.lengths) // 4), strict=True):
            tokens = [k - 1 for k in collapse(row[: int(n)], 0)]
            out.append(self.prompts.tokenizer.decode(tokens) if tokens else "")
        return out

    @staticmethod
    def limits(b: int, padded: int, max_new_tokens: int) -> np.ndarray:
        """Tokens each row may make: `max_new_tokens` for the b real rows, none for the padding rows."""
        return np.where(np.arange(padded) < b, max_new_tokens, 0).astype(np.int32)

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
    if speculative is not False and speculative is not True:
        raise ValueError(
            f"speculative must be False or True (exact: greedy's tokens, verified against the CTC head's draft), got "
            f"{speculative!r}; the leaderboard's thresholded mode, which accepts a confident draft unverified, is not "
            "offered"
        )
    if speculative and num_beams > 1:
        raise ValueError("speculative decoding is greedy: use num_beams=1")
