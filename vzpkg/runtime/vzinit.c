/*
 * vzinit: the minimal pid 1 of a vzpkg VE.
 *
 * - reaps every orphan the VE's processes leave behind;
 * - runs the VE's start-up scripts once (/etc/vzpkg/start: a script, or a directory of them, then
 *   /etc/rc.local), through /bin/sh, only if one of them exists;
 * - on SIGTERM (also SIGINT and SIGPWR) sends SIGTERM to every process of the VE, waits until they are
 *   gone and exits; the kernel then kills whatever is left in the pid namespace.
 *
 * No libc: raw system calls only, so the binary is a few KB, starts in microseconds and costs a few
 * pages of memory per VE (100 idle VEs must fit in 4 MB each).  Built by vzpkg/runtime/init.py with
 *   gcc -Os -static -nostdlib -fno-stack-protector -fno-builtin -o vzinit vzinit.c
 */

typedef unsigned long u64;

#if defined(__x86_64__)
#define NR_rt_sigaction 13
#define NR_rt_sigprocmask 14
#define NR_clone 56
#define NR_execve 59
#define NR_exit_group 231
#define NR_wait4 61
#define NR_kill 62
#define NR_rt_sigtimedwait 128
#define NR_faccessat 269
#define NR_rt_sigreturn 15
static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
__asm__(".text\n.global vz_restorer\nvz_restorer:\n\tmov $15, %rax\n\tsyscall\n");
#define SA_RESTORER 0x04000000
#elif defined(__aarch64__)
#define NR_rt_sigaction 134
#define NR_rt_sigprocmask 135
#define NR_clone 220
#define NR_execve 221
#define NR_exit_group 94
#define NR_wait4 260
#define NR_kill 129
#define NR_rt_sigtimedwait 137
#define NR_faccessat 48
static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;
	register long x3 __asm__("x3") = d;
	register long x4 __asm__("x4") = e;
	register long x5 __asm__("x5") = f;
	__asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5) : "memory");
	return x0;
}
#define SA_RESTORER 0
#else
#error "vzinit: unsupported architecture"
#endif

#define SIGHUP 1
#define SIGINT 2
#define SIGKILL 9
#define SIGUSR1 10
#define SIGTERM 15
#define SIGCHLD 17
#define SIGPWR 30
#define WNOHANG 1
#define ECHILD 10
#define EINTR 4
#define EAGAIN 11
#define AT_FDCWD -100
#define X_OK 1
#define SIG_SETMASK 2

struct ksigaction {
	void (*handler)(int);
	u64 flags;
	void (*restorer)(void);
	u64 mask;
};
struct timespec {
	long tv_sec;
	long tv_nsec;
};

extern void vz_restorer(void);

static void nothing(int sig) { (void)sig; }

static const char START_SCRIPT[] =
	"if [ -d /etc/vzpkg/start ]; then for f in /etc/vzpkg/start/*; do [ -x \"$f\" ] && \"$f\"; done; "
	"elif [ -x /etc/vzpkg/start ]; then /etc/vzpkg/start; fi; "
	"if [ -x /etc/rc.local ]; then /etc/rc.local; fi";

static void run_start_scripts(char **envp)
{
	if (sys6(NR_faccessat, AT_FDCWD, (long)"/etc/vzpkg/start", X_OK, 0, 0, 0) != 0 &&
	    sys6(NR_faccessat, AT_FDCWD, (long)"/etc/rc.local", X_OK, 0, 0, 0) != 0)
		return;
	long pid = sys6(NR_clone, SIGCHLD, 0, 0, 0, 0, 0);
	if (pid == 0) {
		u64 empty = 0;
		sys6(NR_rt_sigprocmask, SIG_SETMASK, (long)&empty, 0, 8, 0, 0);
		char *argv[] = {"sh", "-c", (char *)START_SCRIPT, 0};
		sys6(NR_execve, (long)"/bin/sh", (long)argv, (long)envp, 0, 0, 0);
		sys6(NR_exit_group, 127, 0, 0, 0, 0, 0);
	}
}

/* reap every exited child; returns 1 when no child is left */
static int reap(void)
{
	for (;;) {
		long r = sys6(NR_wait4, -1, 0, WNOHANG, 0, 0, 0);
		if (r == -ECHILD)
			return 1;
		if (r <= 0)
			return 0;
	}
}

static int vz_main(long argc, char **argv, char **envp)
{
	(void)argc;
	(void)argv;
	u64 set = (1UL << (SIGCHLD - 1)) | (1UL << (SIGTERM - 1)) | (1UL << (SIGINT - 1)) |
		  (1UL << (SIGPWR - 1)) | (1UL << (SIGHUP - 1)) | (1UL << (SIGUSR1 - 1));
	/* pid 1 of a namespace never receives signals left at SIG_DFL: install (never run) handlers, then
	   keep the signals blocked and take them synchronously */
	struct ksigaction sa = {nothing, SA_RESTORER, vz_restorer, 0};
	int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGPWR, SIGHUP, SIGUSR1};
	sys6(NR_rt_sigprocmask, SIG_SETMASK, (long)&set, 0, 8, 0, 0);
	for (unsigned i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		sys6(NR_rt_sigaction, sigs[i], (long)&sa, 0, 8, 0, 0);

	run_start_scripts(envp);

	int stopping = 0;
	for (;;) {
		long sig = sys6(NR_rt_sigtimedwait, (long)&set, 0, 0, 8, 0, 0);
		if (sig == SIGCHLD) {
			if (reap() && stopping)
				break;
		} else if (sig == SIGTERM || sig == SIGINT || sig == SIGPWR) {
			if (!stopping) {
				stopping = 1;
				sys6(NR_kill, -1, SIGTERM, 0, 0, 0, 0);
			}
			if (reap())
				break;
		}
	}
	return 0;
}

/* entry point: the initial stack holds argc, argv[], NULL, envp[] */
__attribute__((used)) void vz_start_c(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	sys6(NR_exit_group, vz_main(argc, argv, envp), 0, 0, 0, 0, 0);
}

#if defined(__x86_64__)
__asm__(".text\n.global _start\n_start:\n\txor %rbp, %rbp\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall vz_start_c\n\thlt\n");
#elif defined(__aarch64__)
__asm__(".text\n.global _start\n_start:\n\tmov x0, sp\n\tbl vz_start_c\n");
#endif
