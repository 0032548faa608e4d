// A second tab of the same visitor shows the same conversation live: the
// message sent in the first tab, and its answer while it streams.
import { openWidget, sendMessage, waitForAnswer, waitForPartial } from "../widget_helpers.mjs";

export default async function (ctx) {
  const { page: first, env } = ctx;
  const url = env.HOST_ALLOWED_URL + "/widget.html";
  await ctx.step("open the first tab", async () => { await first.goto(url); await openWidget(first); });
  const second = await ctx.newPage();
  await ctx.step("open the second tab", async () => { await second.goto(url); await openWidget(second); });
  await second.waitForFunction(() => {
    const p = document.querySelector("spillway-chat").shadowRoot.querySelector(".presence");
    return p && p.dataset.devices === "2";
  }, null, { timeout: 10_000 });
  await ctx.step("send from the first tab", () => sendMessage(first, "Hi from tab one"));
  await ctx.step("the second tab streams the answer live", () => waitForPartial(second, env.EXPECTED_TEXT));
  await ctx.step("both tabs end with the whole answer", async () => {
    await waitForAnswer(second, env.EXPECTED_TEXT);
    await waitForAnswer(first, env.EXPECTED_TEXT);
  });
  const users = await second.locator("spillway-chat .msg.user").allTextContents();
  ctx.expectEqual(users, ["Hi from tab one"], "the second tab shows the message");
  ctx.assertNoErrors(first);
  ctx.assertNoErrors(second);
}
