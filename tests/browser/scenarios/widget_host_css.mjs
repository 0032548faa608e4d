// A host page whose CSS attacks everything (colours, fonts, display:none on
// buttons and on the widget's own class names) does not reach the widget,
// and the widget's CSS does not change the host page.
import { ready, sendMessage, waitForAnswer } from "../widget_helpers.mjs";

export default async function (ctx) {
  const { page, env } = ctx;
  await ctx.step("open the hostile host page", () => page.goto(env.HOST_ALLOWED_URL + "/hostile.html"));
  const hostBefore = await page.evaluate(() => {
    const s = getComputedStyle(document.getElementById("host-text"));
    return { color: s.color, background: s.backgroundColor, font: s.fontFamily };
  });
  await ctx.step("the widget starts (open)", () => ready(page));
  await ctx.step("the chat still works", async () => {
    await sendMessage(page, "Still there?");
    await waitForAnswer(page, env.EXPECTED_TEXT);
  });
  const inside = await page.evaluate(() => {
    const host = document.querySelector("spillway-chat");
    const root = host.shadowRoot;
    const style = (sel) => getComputedStyle(root.querySelector(sel));
    const answer = [...root.querySelectorAll(".msg.assistant")].pop();
    return {
      hostOpacity: getComputedStyle(host).opacity,
      launcher: style(".launcher").display,
      send: style(".send").display,
      panel: style(".panel").display,
      answerDisplay: getComputedStyle(answer).display,
      answerColor: getComputedStyle(answer).color,
      answerFont: getComputedStyle(answer).fontFamily,
      answerSize: getComputedStyle(answer).fontSize,
      answerTransform: getComputedStyle(answer).textTransform,
      textareaWidth: root.querySelector("textarea").getBoundingClientRect().width,
    };
  });
  ctx.expectEqual(inside.hostOpacity, "1", "the host element's opacity is the widget's");
  ctx.expect(inside.launcher !== "none" && inside.send !== "none" && inside.panel !== "none", `buttons and panel are displayed (${JSON.stringify(inside)})`);
  ctx.expect(inside.answerDisplay !== "none", "answers are displayed");
  ctx.expect(inside.answerColor !== "rgb(255, 0, 0)", `the answer's colour is the widget's (${inside.answerColor})`);
  ctx.expect(!/comic/i.test(inside.answerFont), `the answer's font is the widget's (${inside.answerFont})`);
  ctx.expectEqual(inside.answerSize, "15px", "the answer's size is the widget's");
  ctx.expectEqual(inside.answerTransform, "none", "no inherited text-transform");
  ctx.expect(inside.textareaWidth > 100, `the message box keeps its width (${inside.textareaWidth}px)`);
  const hostAfter = await page.evaluate(() => {
    const s = getComputedStyle(document.getElementById("host-text"));
    return { color: s.color, background: s.backgroundColor, font: s.fontFamily };
  });
  ctx.expectEqual(hostAfter, hostBefore, "the host page's own styles are unchanged");
  ctx.assertNoErrors();
}
