"""Drives the official OpenAI Python SDK against the gateway.

Usage: sdk_consumer.py BASE_URL MODEL MODE
MODE is `stream` (stream=True with include_usage), `complete` (stream=False)
or `stream-error` (a stream expected to fail mid-way). Prints one JSON object
with what the SDK saw, for tests/openai_sdk.rs to compare with what the fake
upstream sent.
"""
import json
import sys

import openai

base_url, model, mode = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="sk-test-not-a-real-key", max_retries=0)
messages = [{"role": "user", "content": "Say hello"}]

if mode == "stream":
    text, finish, usage, chunks = [], None, None, 0
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    print(json.dumps({"text": "".join(text), "finish": finish, "usage": usage, "chunks": chunks}))
elif mode == "complete":
    completion = client.chat.completions.create(model=model, messages=messages)
    choice = completion.choices[0]
    print(json.dumps({
        "text": choice.message.content,
        "finish": choice.finish_reason,
        "usage": completion.usage.model_dump(exclude_none=True) if completion.usage else None,
        "id": completion.id,
    }))
elif mode == "stream-error":
    text = []
    try:
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
        print(json.dumps({"text": "".join(text), "error": None}))
    except openai.APIError as err:
        print(json.dumps({"text": "".join(text), "error": err.message}))
else:
    sys.exit(f"unknown mode {mode}")
