export * from './contract.js';
export { LocalBackend, localError } from './local.js';
export { MemoryBackend } from './memory.js';
export { FaultyBackend, FaultInjectedError, type Fault, type FaultRule, type FiredFault, type BackendMethod } from './faulty.js';
export { RetryBackend, RetryExhaustedError, type RetryOptions } from './retry.js';
export { StatsBackend, type BackendStats, type MethodStats, type StatsMethod } from './stats.js';
export { S3Backend, S3RequestError, S3UrlError, parseS3Url, s3Error, type S3Operation, type S3BackendOptions, type S3Credentials, type S3Location } from './s3.js';
export { openBackend, openBackendDetailed, OpenBackendError, type OpenBackendOptions, type OpenedBackend } from './open.js';
