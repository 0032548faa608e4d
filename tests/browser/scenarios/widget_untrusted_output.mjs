// Model output is untrusted: markup in an answer renders as text, never as
// elements, and no script of it runs.
import { openWidget, sendMessage, waitForAnswer } from "../widget_helpers.mjs";

export default async function (ctx) {
  const { page, env } = ctx;
  await ctx.step("open the host page", () => page.goto(env.HOST_ALLOWED_URL + "/widget.html"));
  await ctx.step("open the widget", () => openWidget(page));
  await ctx.step("send a message", () => sendMessage(page, "Say something nasty"));
  await ctx.step("the answer is shown as its text", () => waitForAnswer(page, env.EXPECTED_TEXT));
  const found = await page.evaluate(() => {
    const log = document.querySelector("spillway-chat").shadowRoot.querySelector(".log");
    return {
      scripts: log.querySelectorAll("script").length,
      images: log.querySelectorAll("img").length,
      handlers: [...log.querySelectorAll("*")].filter((el) => [...el.attributes].some((a) => a.name.startsWith("on"))).length,
      links: [...log.querySelectorAll("a")].map((a) => a.getAttribute("href")),
      ran: [window.xssScript ?? null, window.xssImage ?? null, window.xssLink ?? null],
    };
  });
  ctx.expectEqual(found.scripts, 0, "no script element was created");
  ctx.expectEqual(found.images, 0, "no img element was created");
  ctx.expectEqual(found.handlers, 0, "no element has an event handler attribute");
  ctx.expectEqual(found.links, [], "a javascript: link is not a link");
  ctx.expectEqual(found.ran, [null, null, null], "nothing of the answer ran");
  ctx.assertNoErrors();
}
