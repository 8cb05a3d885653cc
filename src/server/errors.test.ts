import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from '../protocol/constants.ts';
import { errnoOf, nbdErrorFromErrno } from './errors.ts';

test('errno names map to NBD errors ("Error values")', () => {
  const table: [string | undefined, number][] = [
    ['EPERM', NBD_EPERM],
    ['EACCES', NBD_EPERM],
    ['EROFS', NBD_EPERM],
    ['EIO', NBD_EIO],
    ['ENOMEM', NBD_ENOMEM],
    ['EINVAL', NBD_EINVAL],
    ['ENOSPC', NBD_ENOSPC],
    ['EDQUOT', NBD_ENOSPC],
    ['EFBIG', NBD_ENOSPC],
    ['ESHUTDOWN', NBD_ESHUTDOWN],
    ['EBADF', NBD_EIO],
    ['ESOMETHINGNEW', NBD_EIO],
    [undefined, NBD_EIO],
  ];
  for (const [code, nbd] of table) assert.equal(nbdErrorFromErrno(code), nbd, String(code));
});

test('ENOTSUP and EOVERFLOW only where the spec allows them', () => {
  assert.equal(nbdErrorFromErrno('ENOTSUP', NBD_CMD_FLAG_FAST_ZERO), NBD_ENOTSUP);
  assert.equal(nbdErrorFromErrno('EOPNOTSUPP', NBD_CMD_FLAG_FAST_ZERO), NBD_ENOTSUP);
  assert.equal(nbdErrorFromErrno('ENOTSUP'), NBD_EINVAL);
  assert.equal(nbdErrorFromErrno('EOVERFLOW', NBD_CMD_FLAG_DF), NBD_EOVERFLOW);
  assert.equal(nbdErrorFromErrno('EOVERFLOW'), NBD_EINVAL);
});

test('errnoOf reads a code from any error-like value', () => {
  assert.equal(errnoOf(Object.assign(new Error('x'), { code: 'EIO' })), 'EIO');
  assert.equal(errnoOf(new Error('x')), undefined);
  assert.equal(errnoOf('EIO'), undefined);
  assert.equal(errnoOf(null), undefined);
});
