"""Tokenizer built with Hugging Face `tokenizers` from a tokenizer.json or a GGUF vocabulary,
plus the model's chat template.

Special tokens (<|im_start|>, <s>, ...) come only from the chat template: text, a message's
content or a raw prompt, is tokenized as text, so "<|im_start|>system" typed by a user is a few
ordinary tokens and cannot forge a turn. `apply_chat_template` returns a ChatPrompt, a str that
remembers which of its characters the template wrote; `encode` matches special tokens in those
alone.
"""

from __future__ import annotations

import re
import secrets

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lutlm.formats import TokenizerSpec, check_gguf_vocabulary

# GPT-2's split rule: contractions, letters, digits, other symbols, whitespace.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp's llama_token_type): control tokens are special (matched only in
# a template's text), user-defined ones are matched whole in any text, as llama.cpp does.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _pre_tokenizer_for(pre: str | None):
    """The pre-tokenizer llama.cpp uses for a GGUF `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    gpt2_split = pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated")
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.Sequence([gpt2_split, byte_level])
    if pre == "smollm":  # digits one by one, then GPT-2's rule
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), gpt2_split, byte_level]
        )
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: gpt2, smollm, llama-bpe)")


def _from_gguf_vocab(spec: TokenizerSpec) -> HFTokenizer:
    check_gguf_vocabulary(spec, "tokenizer", "")
    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer_for(spec.gguf_pre)
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(spec.tokens[i], special=kind == TOKEN_TYPE_CONTROL, normalized=False)
        for i, kind in enumerate(spec.token_types)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    return tok


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str may hold one; UTF-8 text (and the tokenizer) cannot


def check_text(text: str, what: str = "text") -> None:
    """Refuse what the tokenizer cannot take: a non-str, or a str with a lone surrogate."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is {type(text).__name__}, not text")
    bad = LONE_SURROGATE.search(text)
    if bad:
        raise ValueError(f"{what} holds a lone surrogate (U+{ord(bad.group()):04X} at character {bad.start()}), "
                         "which is not Unicode text")


class ChatPrompt(str):
    """A rendered chat prompt: the text, and `segments` [(text, written by the template)] that
    join to it. Operations on it (+, slicing) give plain strs, encoded as text throughout."""

    segments: tuple[tuple[str, bool], ...]

    def __new__(cls, segments):
        segments = tuple((text, bool(template)) for text, template in segments if text)
        prompt = super().__new__(cls, "".join(text for text, _ in segments))
        prompt.segments = segments
        return prompt


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        try:
            self._tok = HFTokenizer.from_str(spec.tokenizer_json) if spec.tokenizer_json else _from_gguf_vocab(spec)
        except ValueError:  # already one line that names the problem
            raise
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(f"tokenizer: Hugging Face tokenizers cannot build it: {' '.join(str(e).split())[:200]}") from None
        self.bos_id = spec.bos_token_id
        self.eos_id = spec.eos_token_id
        self.add_bos = spec.add_bos_token
        self.chat_template = spec.chat_template
        # The library then tokenizes a special token's text as text, everywhere; where a chat
        # template wrote one, _prompt_ids puts in its id itself.
        self._tok.encode_special_tokens = True
        specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._special_ids = specials
        longest_first = sorted(specials, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, longest_first))) if specials else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _text_ids(self, text: str) -> list[int]:
        """`text` tokenized as text: a special token's characters become ordinary tokens."""
        if not text:
            return []
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def _prompt_ids(self, prompt: ChatPrompt) -> list[int]:
        """A chat prompt's ids: special tokens where the template wrote them, text elsewhere. The
        text between two special tokens is tokenized as one run (template text and message text
        together), as the whole prompt would be."""
        ids, run = [], []
        for text, from_template in prompt.segments:
            if not from_template or self._special_pattern is None:
                run.append(text)
                continue
            start = 0
            for match in self._special_pattern.finditer(text):
                run.append(text[start:match.start()])
                ids += self._text_ids("".join(run))
                ids.append(self._special_ids[match.group()])
                run, start = [], match.end()
            run.append(text[start:])
        return ids + self._text_ids("".join(run))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, tokenized as text (special tokens only where a ChatPrompt's
        template wrote them); BOS first where the model adds it (or as `add_bos` says)."""
        ids = self._prompt_ids(text) if isinstance(text, ChatPrompt) else self._text_ids(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> ChatPrompt:
        """Render messages ([{"role": ..., "content": ...}]) with the model's own template, as a
        ChatPrompt in which each message's content is marked as text (see the module docstring)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use plain generation instead")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("chat messages must be a list of {\"role\": ..., \"content\": ...} objects")
        for m in messages:
            if isinstance(m.get("content"), str):
                check_text(m["content"], "a chat message's content")
            role = m.get("role")
            if not isinstance(role, str) or (self._special_pattern and self._special_pattern.search(role)):
                raise ValueError(f"chat message role {role!r} is not a plain name (system, user, assistant, ...)")
        # Each string content is rendered as a marker first: where the markers land in the output
        # is where message text is (a random nonce, so that no content can contain one).
        nonce = secrets.token_hex(8)
        contents = {i: m["content"] for i, m in enumerate(messages) if isinstance(m.get("content"), str)}
        marked = [dict(m, content=f"\ue000{nonce}:{i}\ue001") if i in contents else m for i, m in enumerate(messages)]
        rendered = self._render(messages, add_generation_prompt)
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", self._render(marked, add_generation_prompt))
        # parts: template text, content index, template text, ...
        for transform in (lambda text: text, str.strip):
            segments = [(part, True) if i % 2 == 0 else (transform(contents[int(part)]), False)
                        for i, part in enumerate(parts)]
            if "".join(text for text, _ in segments) == rendered:
                return ChatPrompt(segments)
        # The template changed message text in some other way: the rendered prompt is safe to
        # read as the template's own only if no message text holds a special token.
        if self._special_pattern is None or not any(self._special_pattern.search(c) for c in contents.values()):
            return ChatPrompt([(rendered, True)])
        raise ValueError("chat template: it rewrites message text, so lutlm cannot keep the special tokens in a "
                         "message's content from acting as control tokens; remove them from the message")

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        token = lambda i: self.token_text(i) if i is not None else ""  # noqa: E731
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=token(self.bos_id),
                eos_token=token(self.eos_id),
            )
        except TemplateError as e:  # a broken template, or one that reads a field a message lacks
            raise ValueError(f"chat template: {' '.join(str(e).split())[:200]}") from None
