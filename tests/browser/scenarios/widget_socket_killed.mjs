// The page's WebSocket is killed mid-answer: the widget reconnects on its
// own and the answer completes, exactly once.
import { openWidget, sendMessage, waitForAnswer, waitForPartial, trackSockets } from "../widget_helpers.mjs";

export default async function (ctx) {
  const { page, env } = ctx;
  await page.addInitScript(trackSockets);
  await ctx.step("open the host page", () => page.goto(env.HOST_ALLOWED_URL + "/widget.html"));
  await ctx.step("open the widget", () => openWidget(page));
  await ctx.step("send a message", () => sendMessage(page, "Keep going"));
  await waitForPartial(page, env.EXPECTED_TEXT);
  const opened = await page.evaluate(() => window.__sockets.length);
  ctx.expectEqual(opened, 1, "one socket before the kill");
  await ctx.step("kill the socket", () => page.evaluate(() => window.__sockets[0].close()));
  await ctx.step("the answer completes", () => waitForAnswer(page, env.EXPECTED_TEXT));
  const after = await page.evaluate(() => window.__sockets.length);
  ctx.expect(after >= 2, `the widget opened a new socket (${after} in all)`);
  const answers = await page.locator("spillway-chat .msg.assistant").allTextContents();
  ctx.expectEqual(answers, [env.EXPECTED_TEXT], "one answer, whole");
  ctx.assertNoErrors();
}
