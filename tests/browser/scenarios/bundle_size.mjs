// The widget and the SDK, minified, stay under the 40 KB budget. Prints the
// figures (reported in docs/widget.md).
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

export default async function (ctx) {
  const files = ["../../static/widget.js", "../../static/sdk/spillway.js"];
  let total = 0;
  for (const file of files) {
    const out = await build({ entryPoints: [file], minify: true, write: false, bundle: false, logLevel: "error" });
    const bytes = out.outputFiles[0].contents;
    total += bytes.length;
    console.log(`${file}: ${bytes.length} bytes minified, ${gzipSync(bytes, { level: 9 }).length} gzipped`);
  }
  console.log(`total: ${total} bytes minified`);
  ctx.expect(total < 40 * 1024, `widget + SDK minified is under 40 KB (${total} bytes)`);
}
