"""The data of stackd's default seccomp profile: which system calls a service may make.

It has the effect of Docker's default profile (moby/profiles, seccomp/default_linux.go): everything not
listed fails with EPERM; ordinary calls are always allowed; calls that only make sense with a
capability are allowed when the service holds it. `stackd.runtime.seccomp.default_profile` turns these
lists into a `SeccompProfile` and adds the rules that inspect arguments (clone, clone3, socket,
personality), which live next to the code that builds them.

Deliberately never allowed, whatever the capabilities (as in Docker): keyctl, add_key, request_key
(keyrings are not namespaced), userfaultfd, io_uring_setup/enter/register, kexec_load, kexec_file_load,
swapon, swapoff, move_pages, migrate_pages, nfsservctl, uselib, ustat, sysfs, _sysctl, create_module,
get_kernel_syms, query_module, vm86, vm86old, pciconfig_*, open_tree_attr, listns, and every system call
added after the ones named here.

Allowed as in Docker although they sound dangerous: adjtimex and clock_adjtime (the kernel itself demands
CAP_SYS_TIME for anything but reading the clock's state, which NTP clients do), and name_to_handle_at
(harmless alone: only open_by_handle_at, refused without CAP_DAC_READ_SEARCH, can use a handle).
"""

from __future__ import annotations

__all__ = ["ALLOWED", "ALLOWED_ON_ARCH", "ALLOWED_WITH_CAPABILITY"]

#: Allowed for every service. Names this host's libseccomp cannot resolve (other architectures' calls,
#: calls newer than the library and not in seccomp's own table of new x86_64 numbers) are skipped.
ALLOWED: frozenset[str] = frozenset(
    """
    accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64
    clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3
    epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old
    eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate
    fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync
    fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync
    ftruncate ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat
    getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups
    getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid
    getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid getsockname getsockopt
    get_thread_area gettid gettimeofday getuid getuid32 getxattr getxattrat inotify_add_watch inotify_init
    inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents
    io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc kill landlock_add_rule
    landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat listen listmount
    listxattr listxattrat llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise
    map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2
    mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64
    mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal msgctl msgget msgrcv msgsnd msync munlock
    munlockall munmap name_to_handle_at nanosleep newfstatat _newselect open openat openat2 pause
    pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64
    prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev
    pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg
    remap_file_pages removexattr removexattrat rename renameat renameat2 restart_syscall riscv_hwprobe rmdir rseq
    rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
    rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam
    sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
    sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam sched_setscheduler
    sched_yield seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64
    sendmmsg sendmsg sendto setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32
    setitimer setpgid setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32
    setreuid setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address
    setuid setuid32 setxattr setxattrat shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
    sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs statfs64 statmount statx symlink
    symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete
    timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create
    timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate truncate64
    ugetrlimit umask uname unlink unlinkat uretprobe utime utimensat utimensat_time64 utimes vfork
    vmsplice wait4 waitid waitpid write writev
    process_vm_readv process_vm_writev ptrace
    """.split()
)
# ptrace, process_vm_readv and process_vm_writev: Docker allows them on kernels >= 4.8, where seccomp
# runs again after a tracer changes the system call, so ptrace cannot be used to escape the filter.
# stackd needs far newer kernels (pidfds, cgroup.kill), so they are allowed unconditionally.

#: Allowed when the service holds the capability (the kernel checks the capability too; this only
#: stops the filter from refusing the call first). A call may be granted by several capabilities.
ALLOWED_WITH_CAPABILITY: dict[str, frozenset[str]] = {
    cap: frozenset(names.split())
    for cap, names in {
        "CAP_SYS_ADMIN": """
            bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie lsm_get_self_attr
            lsm_list_modules lsm_set_self_attr mount mount_setattr move_mount open_tree perf_event_open
            quotactl quotactl_fd setdomainname sethostname setns syslog umount umount2 unshare
        """,
        "CAP_SYS_BOOT": "reboot",
        "CAP_SYS_CHROOT": "chroot",
        "CAP_SYS_MODULE": "delete_module init_module finit_module",
        "CAP_SYS_PACCT": "acct",
        "CAP_SYS_PTRACE": "kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace",
        "CAP_SYS_RAWIO": "iopl ioperm",
        "CAP_SYS_TIME": "settimeofday stime clock_settime clock_settime64",
        "CAP_SYS_TTY_CONFIG": "vhangup",
        "CAP_SYS_NICE": "get_mempolicy mbind set_mempolicy set_mempolicy_home_node",
        "CAP_SYSLOG": "syslog",
        "CAP_BPF": "bpf",
        "CAP_PERFMON": "perf_event_open",
        "CAP_DAC_READ_SEARCH": "open_by_handle_at",
    }.items()
}

_ARM = frozenset({"arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush", "set_tls"})

#: Allowed on one native architecture only (keys are `platform.machine()` values).
ALLOWED_ON_ARCH: dict[str, frozenset[str]] = {
    "x86_64": frozenset({"arch_prctl", "modify_ldt"}),
    "i686": frozenset({"modify_ldt"}),
    "aarch64": _ARM,
    "armv7l": _ARM,
    "ppc64le": frozenset({"sync_file_range2", "swapcontext"}),
    "s390x": frozenset({"s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"}),
    "riscv64": frozenset({"riscv_flush_icache"}),
}
