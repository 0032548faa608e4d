// The demo page: the widget opens, a message's answer streams into the
// panel in many DOM updates (not one), and nothing logs an error.
import { openWidget, sendMessage, waitForAnswer, waitForPartial, recordAnswerStates, answerStates } from "../widget_helpers.mjs";

export default async function (ctx) {
  const { page, env } = ctx;
  await ctx.step("open the demo page", () => page.goto(env.SPILLWAY_URL + "/", { waitUntil: "load" }));
  await ctx.step("open the widget", () => openWidget(page));
  await ctx.screenshot(page, "widget-open");
  await recordAnswerStates(page);
  await ctx.step("send a message", () => sendMessage(page, "Hello"));
  await waitForPartial(page, env.EXPECTED_TEXT);
  await ctx.screenshot(page, "widget-streaming");
  await ctx.step("the answer completes", () => waitForAnswer(page, env.EXPECTED_TEXT));
  const states = await answerStates(page);
  ctx.expect(states.length >= 5, `the answer arrived in several DOM updates (saw ${states.length})`);
  for (let i = 1; i < states.length; i++) {
    ctx.expect(states[i].startsWith(states[i - 1].replace(/\s+$/, "")), `each update extends the last (update ${i})`);
  }
  const users = await page.locator("spillway-chat .msg.user").allTextContents();
  ctx.expectEqual(users, ["Hello"], "the message is shown once");
  ctx.assertNoErrors();
}
