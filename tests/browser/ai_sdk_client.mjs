// The Vercel AI SDK's own client (the `ai` package's DefaultChatTransport,
// what useChat uses) against the gateway's UI message stream endpoint.
//
//   node ai_sdk_client.mjs send   <gateway> <user> <chat id> <text>
//   node ai_sdk_client.mjs resume <gateway> <user> <chat id>
//
// Prints one JSON line: the assembled message's text and part types, or
// {"none": true} when the resume request found nothing (204).
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [mode, gateway, user, chatId, text] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api: `${gateway}/v1/ai/chat`,
  headers: { "x-spillway-user": user },
});

let stream;
if (mode === "send") {
  stream = await transport.sendMessages({
    chatId,
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
    messages: [{ id: "m1", role: "user", parts: [{ type: "text", text }] }],
  });
} else {
  stream = await transport.reconnectToStream({ chatId });
  if (stream === null) {
    console.log(JSON.stringify({ none: true }));
    process.exit(0);
  }
}

let last = null;
const errors = [];
for await (const message of readUIMessageStream({ stream, onError: (e) => errors.push(String(e)) })) {
  last = message;
}
const parts = last ? last.parts : [];
console.log(JSON.stringify({
  text: parts.filter((p) => p.type === "text").map((p) => p.text).join(""),
  types: parts.map((p) => p.type),
  role: last && last.role,
  errors,
}));
