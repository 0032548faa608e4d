// /embed works in an iframe on an allowed origin (driven by postMessage)
// and is refused by the browser on any other origin (frame-ancestors).
export default async function (ctx) {
  const { page, env } = ctx;
  const key = env.WIDGET_KEY;
  await ctx.step("an allowed origin frames the chat", () => page.goto(`${env.HOST_ALLOWED_URL}/embed.html?key=${key}`));
  const events = (p) => p.evaluate(() => window.fromFrame);
  await ctx.waitFor(async () => (await events(page)).some((e) => e.type === "spillway:ready"), { what: "spillway:ready from the frame", timeout: 15_000 });
  await ctx.step("the page sends through postMessage", () => page.evaluate(() => window.sendToFrame({ type: "spillway:send", text: "Hello from the host" })));
  const reply = await ctx.waitFor(async () => (await events(page)).find((e) => e.type === "spillway:reply"), { what: "spillway:reply from the frame", timeout: 20_000 });
  ctx.expectEqual(reply.text, env.EXPECTED_TEXT, "the frame reports the whole answer");
  ctx.expect((await events(page)).some((e) => e.type === "spillway:message" && e.text === "Hello from the host"), "the frame reports the sent message");
  const frame = page.frames().find((f) => f.url().includes("/embed?"));
  ctx.expect(frame, "the frame shows the embed page");
  const bubble = await frame.locator("spillway-chat .msg.assistant").last().textContent();
  ctx.expectEqual(bubble, env.EXPECTED_TEXT, "the frame shows the answer");
  ctx.assertNoErrors(page);

  const other = await ctx.newPage();
  const refusals = [];
  other.on("console", (m) => { if (/frame-ancestors/.test(m.text())) refusals.push(m.text()); });
  await ctx.step("another origin tries to frame it", () => other.goto(`${env.HOST_OTHER_URL}/embed.html?key=${key}`));
  await ctx.waitFor(() => refusals.length > 0, { what: "the browser's frame-ancestors refusal", timeout: 10_000 });
  const framed = other.frames().filter((f) => f !== other.mainFrame() && f.url().includes("/embed?"));
  for (const f of framed) {
    const hasWidget = await f.evaluate(() => !!document.querySelector("spillway-chat")).catch(() => false);
    ctx.expect(!hasWidget, "the refused frame holds no chat");
  }
  ctx.expectEqual(await other.evaluate(() => window.fromFrame), [], "the refused frame sends nothing");
}
