/**
 * Runs the test s3rver (test/helpers/s3rver.ts) on 127.0.0.1 until SIGTERM/SIGINT and prints its
 * handle as one JSON line on stdout (url, endpoint, bucket, accessKeyId, secretAccessKey). Used by
 * bench/s3/run.sh and for trying the CLI by hand:
 *   npx tsx bench/s3/s3rver-serve.ts > /tmp/s3.json &
 */
import { startS3rver } from '../../test/helpers/s3rver.js';

const s = await startS3rver({ bucket: process.env.S3_BUCKET ?? 'vmsnap-bench' });
process.stdout.write(JSON.stringify({ url: s.url, endpoint: s.endpoint, bucket: s.bucket, accessKeyId: s.accessKeyId, secretAccessKey: s.secretAccessKey, directory: s.directory }) + '\n');
const stop = () => {
  void s.stop().then(() => process.exit(0));
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
setInterval(() => undefined, 1 << 30);
