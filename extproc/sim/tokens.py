"""Token counting and generated text for the simulator: no tokenizer, exact and documented rules.

Prompt tokens (close to a BPE tokenizer on English text, which averages ~4 bytes per token):
  text:        ceil(utf8_bytes / 4)
  completions: text rule on the prompt string (at least 1); a list of token ids counts its length
  chat:        CHAT_OVERHEAD + sum over messages of (PER_MESSAGE + text rule on the message's text),
               like a Llama-3 chat template (begin-of-text + assistant header; role header + end
               marker per message). Only text content counts (string, or "text" parts of a list).

Generated text: output token i (0-based) is FILLER[i % len(FILLER)]. Each filler word is 4 bytes
including its leading space and a single token in common tokenizers, so the text rule above gives
back exactly the number of generated tokens.
"""

from __future__ import annotations

from typing import Any

CHAT_OVERHEAD = 5
PER_MESSAGE = 4
FILLER: tuple[str, ...] = (
    " the", " and", " for", " you", " are", " not", " but", " can", " all", " one",
    " was", " use", " new", " any", " may", " its", " how", " our", " out", " way",
)


class PromptError(ValueError):
    """The request's prompt or messages are malformed (an HTTP 400)."""


def text_tokens(text: str) -> int:
    return -(-len(text.encode("utf-8")) // 4)


def message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise PromptError("content parts must be objects")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise PromptError("a text content part needs a string 'text'")
                parts.append(part["text"])
        return "".join(parts)
    raise PromptError("message content must be a string, a list of parts, or null")


def chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list")
    total = CHAT_OVERHEAD
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise PromptError("each message must be an object with a string 'role'")
        total += PER_MESSAGE + text_tokens(message_text(m.get("content")))
    return total


def completion_prompt_tokens(prompt: Any) -> int:
    # A batch of one prompt is accepted; larger batches are not simulated.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return max(1, text_tokens(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    raise PromptError("'prompt' must be a string, a list of token ids, or a list with one of those")


def filler_text(start: int, end: int) -> str:
    """The text of output tokens [start, end)."""
    n = len(FILLER)
    return "".join(FILLER[i % n] for i in range(start, end))
