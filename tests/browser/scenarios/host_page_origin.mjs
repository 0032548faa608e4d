// The host-page servers are origins of their own, apart from the gateway
// and from each other: what cross-origin widget scenarios rely on.
export default async function (ctx) {
  const { page, env } = ctx;
  await ctx.step("open a blank page on the other host", () => page.goto(env.HOST_OTHER_URL + "/blank.html"));
  const origin = await page.evaluate(() => location.origin);
  const gateway = new URL(env.SPILLWAY_URL).origin;
  const allowed = new URL(env.HOST_ALLOWED_URL).origin;
  ctx.expectEqual(origin, new URL(env.HOST_OTHER_URL).origin, "the page is served from HOST_OTHER_URL");
  ctx.expect(origin !== gateway, `the page's origin ${origin} is not the gateway's`);
  ctx.expect(origin !== allowed, `the page's origin ${origin} is not HOST_ALLOWED's`);
  const gatewayShown = await page.textContent("#gateway");
  ctx.expectEqual(gatewayShown, env.SPILLWAY_URL, "{{GATEWAY}} was replaced by the gateway URL");
  ctx.assertNoErrors();
}
