"""The torch reference for the 4.x speech LLM: whole `GraniteSpeechForConditionalGeneration` checkpoints made on
the spot with transformers (every parameter and buffer perturbed, the language model strongly enough that its
text depends on the audio and the prompt), a byte-level BPE tokenizer trained here with `tokenizers` and a
Granite-style chat template, and the processor that goes with them. Needs torch and transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.testing.hf import perturb_, require_torch

SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|audio|>"]
EOS, AUDIO = "<|end_of_text|>", "<|audio|>"
# Granite's shape of template: role markers, a system turn when the conversation has none, the assistant cue.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}<|start_of_role|>system<|end_of_role|>Knowledge cutoff: "
    "{{ strftime_now('%Y') and 'April 2024' }}. You are Granite.{{ eos_token }}\n{%- endif %}"
    "{%- for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
    "{{ message['content'] }}{{ eos_token }}\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{%- endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "can you transcribe the speech into a written format?",
    "translate the speech into french please",
    "you are granite, a helpful assistant. knowledge cutoff april 2024",
    "flight two three seven leaves gate eighteen at nine forty",
    "please send the quarterly report to maria before friday",
    "system user assistant hello world how are you today",
]
# The released 4.x language model's GraniteConfig (granite-speech-4.1-2b): production-width tests, demo, benchmark.
RELEASED_TEXT = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=40,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    embedding_multiplier=12.0,
    attention_multiplier=0.0078125,
    residual_multiplier=0.22,
    logits_scaling=8.0,
    vocab_size=100353,
)
# A small language model: every feature of the real one (GQA, biases off, Granite's multipliers).
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    embedding_multiplier=4.0,
    attention_multiplier=0.125,
    residual_multiplier=0.5,
    logits_scaling=1.0,
)


def train_llm_tokenizer(vocab_size: int = 320, texts: Sequence[str] = CORPUS):
    """A GPT-2-style byte-level BPE `tokenizers.Tokenizer` whose first ids are SPECIAL_TOKENS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts) * 20, trainer)
    return tok


def hf_llm_tokenizer(tokenizer):
    """transformers' fast tokenizer around it, with the chat template and Granite's special tokens."""
    _, tf = require_torch()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def hf_speech_llm(
    cfg: EncoderConfig,
    tokenizer,
    *,
    seed: int = 0,
    projector: dict | None = None,
    text: dict | None = None,
    tie: bool = True,
    lm_scale: float = 2.0,
):
    """A perturbed GraniteSpeech(Plus)ForConditionalGeneration in eval mode, its vocabulary the tokenizer's.

    `text`: GraniteConfig fields over TINY_TEXT; `tie`: the top-level tie_word_embeddings (untied: `lm_head`
    is a parameter of its own); `lm_scale`: a gain on the language model's projections (so that its text
    depends on its input)."""
    torch, tf = require_torch()
    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id(EOS)
    text_cfg = dict(TINY_TEXT, model_type="granite", vocab_size=vocab, bos_token_id=eos, eos_token_id=eos)
    text_cfg.update(pad_token_id=eos, **(text or {}))
    settings = dict(projector or {})
    if "llm_hidden_size" in settings:  # the projector's output width is the language model's
        text_cfg["hidden_size"] = settings.pop("llm_hidden_size")
    top = {k: settings.pop(k) for k in ("window_size", "downsample_rate") if k in settings}
    qformer = dict(
        model_type="blip_2_qformer",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=cfg.output_width,
    )
    qformer.update(settings)
    cls_cfg = tf.GraniteSpeechPlusConfig if cfg.is_plus else tf.GraniteSpeechConfig
    cls = tf.GraniteSpeechPlusForConditionalGeneration if cfg.is_plus else tf.GraniteSpeechForConditionalGeneration
    full = cls_cfg(
        encoder_config=cfg.to_hf_dict(),
        text_config=text_cfg,
        projector_config=qformer,
        has_lora_adapter=False,
        audio_token_index=tokenizer.token_to_id(AUDIO),
        tie_word_embeddings=tie,
        **top,
    )
    model = cls(full).eval()
    perturb_(model.model.encoder, seed=seed)
    perturb_(model.model.projector, seed=seed + 10_000)
    perturb_(model.model.language_model, seed=seed + 20_000, scale=0.3)
    if not tie:
        perturb_(model.lm_head, seed=seed + 30_000)
    with torch.no_grad():  # branches strong enough that the text depends on the audio and the prompt
        for name, p in model.model.language_model.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.mul_(lm_scale)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.generation_config.bos_token_id = eos
    return model


def make_hf_speech_checkpoint(cfg: EncoderConfig, path: str | os.PathLike, tokenizer, **kwargs) -> tuple[Any, Any]:
    """Save `hf_speech_llm(cfg, tokenizer, **kwargs)` with its feature extractor and tokenizer at `path`;
    return (the model in fp32, eval mode; its `GraniteSpeechProcessor`)."""
    _, tf = require_torch()
    model = hf_speech_llm(cfg, tokenizer, **kwargs)
    model.save_pretrained(os.fspath(path))
    window, down = model.config.window_size, model.config.downsample_rate
    extractor = tf.GraniteSpeechFeatureExtractor(projector_window_size=window, projector_downsample_rate=down)
    processor = tf.GraniteSpeechProcessor(extractor, hf_llm_tokenizer(tokenizer))
    processor.save_pretrained(os.fspath(path))
    processor.tokenizer.save_pretrained(os.fspath(path))
    return model, processor


def hf_generate(model, processor, wave, prompt: str | None = None, **generate_kwargs) -> list[int]:
    """HF's ids after the prompt for one utterance (`generate` with the chat template applied as the model card
    does it), up to and including the first eos."""
    torch, _ = require_torch()
    import numpy as np

    from granite_jax.text.prompt import DEFAULT_PROMPT

    chat = [{"role": "user", "content": AUDIO + (DEFAULT_PROMPT if prompt is None else prompt)}]
    text = processor.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    inputs = processor(text, np.asarray(wave, np.float32), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **generate_kwargs)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids
