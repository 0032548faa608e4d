// Reloading the page mid-answer resumes the answer to its full text, with
// no text lost and none repeated.
import { openWidget, sendMessage, waitForAnswer, waitForPartial } from "../widget_helpers.mjs";

export default async function (ctx) {
  const { page, env } = ctx;
  const url = env.HOST_ALLOWED_URL + "/widget.html";
  await ctx.step("open the host page", () => page.goto(url));
  await ctx.step("open the widget", () => openWidget(page));
  await ctx.step("send a message", () => sendMessage(page, "Tell me a story"));
  const before = await waitForPartial(page, env.EXPECTED_TEXT);
  ctx.expect(env.EXPECTED_TEXT.startsWith(before.trim()), "the partial answer is a prefix of the answer");
  await ctx.step("reload mid-answer", () => page.reload());
  await ctx.step("the answer completes after the reload", async () => {
    await openWidget(page);
    await waitForAnswer(page, env.EXPECTED_TEXT);
  });
  const users = await page.locator("spillway-chat .msg.user").allTextContents();
  ctx.expectEqual(users, ["Tell me a story"], "the message is shown once");
  const answers = await page.locator("spillway-chat .msg.assistant").allTextContents();
  ctx.expectEqual(answers, [env.EXPECTED_TEXT], "one answer, whole");
  ctx.assertNoErrors();
}
