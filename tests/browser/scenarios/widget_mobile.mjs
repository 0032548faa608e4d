// On a phone-sized viewport the open panel fills the screen.
import { openWidget, sendMessage, waitForPartial, waitForAnswer } from "../widget_helpers.mjs";

export default async function (ctx) {
  const context = await ctx.newContext({ viewport: { width: 390, height: 760 }, isMobile: true, hasTouch: true });
  const page = await ctx.newPage(context);
  const { env } = ctx;
  await ctx.step("open the demo page", () => page.goto(env.SPILLWAY_URL + "/"));
  await ctx.step("open the widget", () => openWidget(page));
  const box = await page.locator("spillway-chat .panel").boundingBox();
  ctx.expect(box && box.x === 0 && box.y === 0 && box.width === 390 && box.height === 760, `the panel fills the viewport (${JSON.stringify(box)})`);
  await sendMessage(page, "On my phone");
  await waitForPartial(page, env.EXPECTED_TEXT);
  await waitForAnswer(page, env.EXPECTED_TEXT);
  await ctx.screenshot(page, "widget-mobile");
  ctx.assertNoErrors(page);
}
