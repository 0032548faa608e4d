// The demo page at / loads cleanly: no console errors, no uncaught errors.
export default async function (ctx) {
  const { page, env } = ctx;
  await ctx.step("open the demo page", () => page.goto(env.SPILLWAY_URL + "/", { waitUntil: "load" }));
  const title = await page.title();
  ctx.expect(title.includes("Spillway"), `the title contains "Spillway" (it is ${JSON.stringify(title)})`);
  ctx.assertNoErrors();
  await ctx.screenshot(page, "demo-page");
}
