/*
 * AES-256-GCM into caller buffers, for the chunk workers (src/store/crypto.ts). node:crypto
 * allocates a fresh output buffer and a fresh cipher context (key schedule, GHASH tables) per
 * call: for a 64 KiB chunk that costs more than the cipher itself. Here each thread keeps one
 * context per direction, keyed once, and writes straight into the buffer it is given.
 *
 * Built by scripts/setup.sh against Node's own headers and OpenSSL (node exports its libcrypto
 * symbols); when it is missing, crypto.ts falls back to node:crypto. The format is the same.
 *
 *   openInto(key[32], box, aad, dst) -> plaintext length, or -1 when authentication fails
 *       box = nonce(12) | ciphertext | tag(16); dst holds at least box.length - 28 bytes; on
 *       failure the unverified plaintext written to dst is wiped
 *   sealInto(key[32], nonce[12], plaintext, aad, dst) -> box length
 *       writes nonce | ciphertext | tag to dst (at least plaintext.length + 28 bytes)
 *
 * dst may not overlap the input (a RangeError): the nonce goes first and would clobber it.
 * Built with -z now, so missing OpenSSL symbols fail the load (and crypto.ts falls back) instead
 * of killing the process at the first call.
 */
#include <node_api.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#define NONCE 12
#define TAG 16

typedef struct {
  EVP_CIPHER_CTX *ctx;
  unsigned char key[32];
  int keyed;
} Dir;

typedef struct {
  Dir dec, enc;
} State;

static void free_state(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  State *s = data;
  OPENSSL_cleanse(s->dec.key, sizeof s->dec.key);
  OPENSSL_cleanse(s->enc.key, sizeof s->enc.key);
  if (s->dec.ctx) EVP_CIPHER_CTX_free(s->dec.ctx);
  if (s->enc.ctx) EVP_CIPHER_CTX_free(s->enc.ctx);
  free(s);
}

static State *state(napi_env env) {
  State *s = NULL;
  napi_get_instance_data(env, (void **)&s);
  if (s) return s;
  s = calloc(1, sizeof *s);
  if (!s) return NULL;
  if (napi_set_instance_data(env, s, free_state, NULL) != napi_ok) {
    free(s);
    return NULL;
  }
  return s;
}

static int bytes(napi_env env, napi_value v, unsigned char **p, size_t *n) {
  napi_typedarray_type t;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &t, n, (void **)p, &ab, &off) != napi_ok || t != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "aead: arguments must be Uint8Arrays");
    return 0;
  }
  return 1;
}

static napi_value number(napi_env env, double d) {
  napi_value v = NULL;
  if (napi_create_double(env, d, &v) != napi_ok) return NULL;
  return v;
}

static int overlap(const unsigned char *a, size_t an, const unsigned char *b, size_t bn) {
  return an && bn && a < b + bn && b < a + an;
}

/* Keys the context only when the key changes: the schedule and GHASH tables are the costly part. */
static int keyed(Dir *d, const unsigned char *key, int enc) {
  if (!d->ctx && !(d->ctx = EVP_CIPHER_CTX_new())) return 0;
  if (!d->keyed || memcmp(d->key, key, 32) != 0) {
    if (EVP_CipherInit_ex(d->ctx, EVP_aes_256_gcm(), NULL, key, NULL, enc) != 1) return 0;
    memcpy(d->key, key, 32);
    d->keyed = 1;
  }
  return 1;
}

static napi_value open_into(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  unsigned char *key, *box, *aad, *dst;
  size_t keyLen, boxLen, aadLen, dstLen;
  if (argc < 4) {
    napi_throw_type_error(env, NULL, "aead.openInto: needs key, box, aad, dst");
    return NULL;
  }
  if (!bytes(env, argv[0], &key, &keyLen) || !bytes(env, argv[1], &box, &boxLen) || !bytes(env, argv[2], &aad, &aadLen) ||
      !bytes(env, argv[3], &dst, &dstLen))
    return NULL;
  if (keyLen != 32 || boxLen < NONCE + TAG || dstLen < boxLen - NONCE - TAG || aadLen > 0x7fffffff || boxLen > 0x7fffffff) {
    napi_throw_range_error(env, NULL, "aead.openInto: bad key, box or destination length");
    return NULL;
  }
  if (overlap(dst, dstLen, box, boxLen) || overlap(dst, dstLen, aad, aadLen)) {
    napi_throw_range_error(env, NULL, "aead.openInto: the destination overlaps the input");
    return NULL;
  }
  State *s = state(env);
  if (!s || !keyed(&s->dec, key, 0)) {
    napi_throw_error(env, NULL, "aead.openInto: cannot set up the cipher");
    return NULL;
  }
  EVP_CIPHER_CTX *c = s->dec.ctx;
  int n = 0, m = 0;
  int ctLen = (int)(boxLen - NONCE - TAG);
  if (EVP_DecryptInit_ex(c, NULL, NULL, NULL, box) != 1 || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG, box + NONCE + ctLen) != 1 ||
      EVP_DecryptUpdate(c, NULL, &n, aad, (int)aadLen) != 1 || EVP_DecryptUpdate(c, dst, &n, box + NONCE, ctLen) != 1 ||
      EVP_DecryptFinal_ex(c, dst + n, &m) != 1) {
    OPENSSL_cleanse(dst, (size_t)ctLen);
    return number(env, -1);
  }
  return number(env, n + m);
}

static napi_value seal_into(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  unsigned char *key, *nonce, *pt, *aad, *dst;
  size_t keyLen, nonceLen, ptLen, aadLen, dstLen;
  if (argc < 5) {
    napi_throw_type_error(env, NULL, "aead.sealInto: needs key, nonce, plaintext, aad, dst");
    return NULL;
  }
  if (!bytes(env, argv[0], &key, &keyLen) || !bytes(env, argv[1], &nonce, &nonceLen) || !bytes(env, argv[2], &pt, &ptLen) ||
      !bytes(env, argv[3], &aad, &aadLen) || !bytes(env, argv[4], &dst, &dstLen))
    return NULL;
  if (keyLen != 32 || nonceLen != NONCE || ptLen > 0x7fffffff - NONCE - TAG || dstLen < ptLen + NONCE + TAG || aadLen > 0x7fffffff) {
    napi_throw_range_error(env, NULL, "aead.sealInto: bad key, nonce or destination length");
    return NULL;
  }
  if (overlap(dst + NONCE, dstLen - NONCE, pt, ptLen) || overlap(dst + NONCE, dstLen - NONCE, aad, aadLen) ||
      overlap(dst + NONCE, dstLen - NONCE, nonce, NONCE) || overlap(dst, NONCE, pt, ptLen)) {
    napi_throw_range_error(env, NULL, "aead.sealInto: the destination overlaps the input");
    return NULL;
  }
  State *s = state(env);
  EVP_CIPHER_CTX *c;
  int n = 0, m = 0;
  if (!s || !keyed(&s->enc, key, 1)) goto fail;
  c = s->enc.ctx;
  memmove(dst, nonce, NONCE);
  if (EVP_EncryptInit_ex(c, NULL, NULL, NULL, dst) != 1 || EVP_EncryptUpdate(c, NULL, &n, aad, (int)aadLen) != 1 ||
      EVP_EncryptUpdate(c, dst + NONCE, &n, pt, (int)ptLen) != 1 || EVP_EncryptFinal_ex(c, dst + NONCE + n, &m) != 1 ||
      EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG, dst + NONCE + n + m) != 1)
    goto fail;
  return number(env, NONCE + n + m + TAG);
fail:
  napi_throw_error(env, NULL, "aead.sealInto: encryption failed");
  return NULL;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  napi_value f;
  napi_create_function(env, "openInto", NAPI_AUTO_LENGTH, open_into, NULL, &f);
  napi_set_named_property(env, exports, "openInto", f);
  napi_create_function(env, "sealInto", NAPI_AUTO_LENGTH, seal_into, NULL, &f);
  napi_set_named_property(env, exports, "sealInto", f);
  return exports;
}
