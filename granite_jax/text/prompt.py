"""Chat prompts for the 4.x speech models, as transformers builds them, without transformers.

The checkpoint's chat template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) is
rendered with jinja2 the way `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)` renders it (a sandboxed environment with trim_blocks and lstrip_blocks, its `tojson`,
`raise_exception` and `strftime_now`, the special tokens as variables), tokenized with the `tokenizers`
library as the processor does, and the one audio placeholder is expanded to the utterance's count of audio
embeddings (`GraniteSpeechProcessor`: `<|audio|>` repeated `audio_embed_sizes[i]` times).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from granite_jax.text.tokenizer import clean_up, clean_up_spaces

DEFAULT_PROMPT = "can you transcribe the speech into a written format?"
AUDIO_TOKEN = "<|audio|>"
TEMPLATE_FILE = "chat_template.jinja"
# what a converted checkpoint carries over for prompts and decoding
PROMPT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    TEMPLATE_FILE,
    "chat_template.json",
    "generation_config.json",
)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class PromptError(ValueError):
    """A prompt, chat template or tokenizer that cannot make a speech prompt; the message names which."""


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise PromptError(f"{path} must hold a JSON object")
    return value


def compile_template(source: str):
    """The chat template compiled as transformers compiles it (`_compile_jinja_template`)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"the chat template does not compile: {e}") from None


class PromptBuilder:
    """Prompt text -> token ids for one utterance: render, tokenize, expand the audio placeholder.

    `tokenizer`: a `tokenizers.Tokenizer`; `template`: the chat template's source; `special`: the special
    tokens' strings the template sees (`bos_token`, `eos_token`, ...); `audio_token_id`: the model's.
    """

    def __init__(
        self,
        tokenizer,
        template: str | None,
        special: dict[str, str],
        audio_token_id: int,
        audio_token: str = AUDIO_TOKEN,
        source: str = "",
        clean_up_tokenization_spaces: bool = False,
    ):
        self.tokenizer = tokenizer
        self.template_source = template
        self._template = compile_template(template) if template else None
        self.special = dict(special)
        self.audio_token = audio_token
        self.audio_token_id = int(audio_token_id)
        self.source = source
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        found = tokenizer.token_to_id(audio_token)
        if found is None:
            raise PromptError(f"the tokenizer at {source or '?'} has no audio token {audio_token!r}")
        if found != self.audio_token_id:
            raise PromptError(
                f"the tokenizer at {source or '?'} gives {audio_token!r} id {found}; the model's audio_token_id is "
                f"{self.audio_token_id}"
            )

    @classmethod
    def from_dir(cls, path: str | os.PathLike, audio_token_id: int) -> PromptBuilder:
        """From a folder with `tokenizer.json`, `tokenizer_config.json` and the chat template."""
        from tokenizers import Tokenizer

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises its own Exception type
            raise PromptError(f"cannot read the tokenizer {file}: {e}") from None
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if os.path.exists(os.path.join(path, name)):
                config.update(_read_json(os.path.join(path, name)))
        template = None
        if os.path.exists(os.path.join(path, TEMPLATE_FILE)):
            with open(os.path.join(path, TEMPLATE_FILE), encoding="utf-8") as f:
                template = f.read()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        elif os.path.exists(os.path.join(path, "chat_template.json")):
            template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        special = {k: _content(config.get(k)) for k in _SPECIAL if _content(config.get(k)) is not None}
        audio = _content(config.get("audio_token")) or AUDIO_TOKEN
        return cls(tokenizer, template, special, audio_token_id, audio, path, clean_up_spaces(tokenizer, config))

    def messages(self, prompt: str | Sequence[dict] | None) -> list[dict]:
        """A string is the user turn after the audio token; a list of chat messages is taken verbatim."""
        if prompt is None:
            prompt = DEFAULT_PROMPT
        if isinstance(prompt, str):
            return [{"role": "user", "content": self.audio_token + prompt}]
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt) and prompt:
            return [dict(m) for m in prompt]
        raise PromptError(
            f"prompt must be a string (the user turn after the audio) or a non-empty list of chat messages (dicts "
            f"with role and content), got {type(prompt).__name__}"
        )

    def render(self, prompt: str | Sequence[dict] | None = None) -> str:
        """The prompt text: `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`."""
        if self._template is None:
            raise PromptError(
                f"the checkpoint at {self.source or '?'} has no chat template (chat_template.jinja or "
                "tokenizer_config.json's chat_template)"
            )
        import jinja2

        try:
            return self._template.render(
                messages=self.messages(prompt), tools=None, documents=None, add_generation_prompt=True, **self.special
            )
        except jinja2.exceptions.TemplateError as e:
            raise PromptError(f"the chat template refused the prompt: {e}") from None

    def ids(self, prompt: str | Sequence[dict] | None, num_audio: int) -> list[int]:
        """Token ids of the rendered prompt with its one audio token repeated `num_audio` times."""
        ids = self.tokenizer.encode(self.render(prompt), add_special_tokens=True).ids
        where = [i for i, t in enumerate(ids) if t == self.audio_token_id]
        if len(where) != 1:
            raise PromptError(
                f"the prompt holds {len(where)} audio tokens ({self.audio_token!r}); it must hold exactly one, "
                "where the utterance's audio goes"
            )
        k = where[0]
        return ids[:k] + [self.audio_token_id] * int(num_audio) + ids[k + 1 :]

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> text (`batch_decode(..., skip_special_tokens=True)`)."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up(text) if self.clean_up_tokenization_spaces else text
