// With data-transport="sse" the widget streams over SSE-over-fetch: no
// WebSocket at all, and the answer is the same.
import { openWidget, sendMessage, waitForAnswer, waitForPartial, trackSockets } from "../widget_helpers.mjs";

export default async function (ctx) {
  const { page, env } = ctx;
  await page.addInitScript(trackSockets);
  await ctx.step("open the host page", () => page.goto(env.HOST_ALLOWED_URL + "/widget.html?transport=sse"));
  await ctx.step("open the widget", () => openWidget(page));
  await ctx.step("send a message", () => sendMessage(page, "Over SSE"));
  await waitForPartial(page, env.EXPECTED_TEXT);
  await ctx.step("the answer completes", () => waitForAnswer(page, env.EXPECTED_TEXT));
  const state = await page.evaluate(() => ({ sockets: window.__sockets.length, transport: document.querySelector("spillway-chat").spillway.transport }));
  ctx.expectEqual(state, { sockets: 0, transport: "sse" }, "the SSE transport, no WebSocket");
  ctx.assertNoErrors();
}
