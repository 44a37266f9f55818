/* Preloaded (through /etc/ld.so.preload) into every process of a gVisor sandbox.
 *
 * Debian 12's runsc (a build of late 2022) answers EINVAL to statx and fstatat calls that pass
 * AT_NO_AUTOMOUNT, which bookworm's coreutils always do: `ls` and `stat` would fail on every
 * path. gVisor has no automounts, so the flag means nothing there: these wrappers drop it and
 * make the system call. Built by the runtime with `gcc -shared -nostdlib`; the one symbol it
 * needs, glibc's syscall(), comes from the process's own libc.
 */
#define AT_NO_AUTOMOUNT 0x800
#if defined(__x86_64__)
#define SYS_newfstatat 262
#define SYS_statx 332
#elif defined(__aarch64__)
#define SYS_newfstatat 79
#define SYS_statx 291
#else
#error "unknown architecture: add its statx and newfstatat numbers"
#endif

long syscall(long number, ...);

int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf)
{
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}

int fstatat(int dirfd, const char *path, void *buf, int flags)
{
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}

int fstatat64(int dirfd, const char *path, void *buf, int flags)
{
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}
