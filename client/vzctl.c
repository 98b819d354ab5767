/* vzctl's front end: hands the command to the resident vzctl server when one answers on this installation's
 * socket (vzpkg/cli/server.py, which describes the protocol), and otherwise runs the Python vzctl itself.
 *
 * Why C: a Python vzctl spends ~7 ms starting its interpreter before it does anything, more than LXC needs for
 * a whole lxc-copy or lxc-stop; this front end starts in well under a millisecond. It only decides, connects,
 * passes its standard descriptors and working directory, forwards signals and exits with the command's status:
 * every decision about VEs is made in Python.
 *
 * It talks only to a server running as root (whatever $VZCTL_SERVER_SOCKET names), passes its descriptors only
 * once the server has taken the command (R), and runs the command itself when no answer comes within
 * ACCEPT_TIMEOUT seconds (a stopped or hung server).
 *
 * Built by `make setup` (see the Makefile) with two paths compiled in:
 *   VZCTL_SOCKET   the server's socket ($VZCTL_SERVER_SOCKET overrides it)
 *   VZCTL_PYTHON   the venv's python, which runs `vzpkg.cli.vzctl` when no server serves the command
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef VZCTL_SOCKET
#error "build with -DVZCTL_SOCKET=\"...\" (make setup does)"
#endif
#ifndef VZCTL_PYTHON
#error "build with -DVZCTL_PYTHON=\"...\" (make setup does)"
#endif

#define SERVER_LOST 68 /* ServerLostError in vzpkg/errors.py */
#ifndef ACCEPT_TIMEOUT
#define ACCEPT_TIMEOUT 10 /* seconds (the tests build with less) */
#endif

extern char **environ;
static volatile pid_t command_pid;
static volatile sig_atomic_t stop_too; /* ^Z stops the command too (SIGTSTP was not ignored) */
static volatile int command_pidfd = -1; /* signals go through it: never to another process that got the pid */
static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT, SIGTSTP};

/* Run the Python vzctl with our arguments. -I: neither the working directory nor PYTHON* variables decide
 * which code root runs. */
static void run_directly(int argc, char **argv)
{
    char **args = calloc((size_t)argc + 4, sizeof(char *));
    if (!args) {
        perror("vzctl");
        exit(1);
    }
    args[0] = VZCTL_PYTHON;
    args[1] = "-I";
    args[2] = "-c";
    args[3] = "import sys; sys.argv[0] = 'vzctl'; from vzpkg.cli.vzctl import main; main()";
    for (int i = 1; i < argc; i++)
        args[i + 3] = argv[i];
    execv(VZCTL_PYTHON, args);
    fprintf(stderr, "vzctl: error: cannot run %s: %s (rerun make setup)\n", VZCTL_PYTHON, strerror(errno));
    exit(127);
}

/* The command's name: the first argument that is not an option (--root takes a value). */
static const char *command_of(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--root")) {
            i++;
            continue;
        }
        if (argv[i][0] != '-')
            return argv[i];
    }
    return NULL;
}

/* Commands the server does not take: a terminal session (enter, console, exec on a terminal: job control
 * needs the terminal's own session), the server's own management, and the receiving end of a migration. */
static int served(int argc, char **argv)
{
    const char *v = getenv("VZCTL_SERVER");
    if (v && (!strcmp(v, "0") || !strcmp(v, "off") || !strcmp(v, "no")))
        return 0;
    const char *cmd = command_of(argc, argv);
    if (!cmd || !strcmp(cmd, "enter") || !strcmp(cmd, "console") || !strcmp(cmd, "server") ||
        !strcmp(cmd, "migrate-receive"))
        return 0;
    if ((!strcmp(cmd, "exec") || !strcmp(cmd, "exec2")) && isatty(0))
        return 0;
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0) /* a closed standard descriptor cannot be passed */
            return 0;
    return 1;
}

static int read_full(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

static void put_u32(char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (char)((v >> (8 * i)) & 0xff);
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void forward(int sig)
{
    if (sig == SIGTSTP || sig == SIGCONT) {
        /* ^Z: the command's process group (its own session's: no terminal stops it) stops with us, as it
         * would in ours; fg or bg continues it. */
        int saved = errno;
        struct sigaction sa = {.sa_handler = sig == SIGTSTP ? SIG_DFL : forward, .sa_flags = SA_RESTART};
        sigemptyset(&sa.sa_mask);
        if (command_pid > 1)
            kill(-command_pid, sig == SIGTSTP ? SIGSTOP : SIGCONT);
        if (sig == SIGTSTP || stop_too) {
            sigaction(SIGTSTP, &sa, NULL);
            if (sig == SIGTSTP)
                raise(SIGTSTP); /* delivered, by default, as this handler returns: we stop */
        }
        errno = saved;
        return;
    }
    if (command_pidfd >= 0)
        syscall(SYS_pidfd_send_signal, command_pidfd, sig, NULL, 0);
    else if (command_pid > 0)
        kill(command_pid, sig);
}

/* The command's end: its X (0), or -1 when the connection closes without one or when the command has ended
 * and no X follows within ACCEPT_TIMEOUT (the server was stopped or hangs). */
static int wait_end(int sock, unsigned char *reply)
{
    struct pollfd fds[2] = {{.fd = sock, .events = POLLIN}, {.fd = command_pidfd, .events = POLLIN}};
    int ended = 0;
    for (;;) {
        int n = poll(fds, command_pidfd >= 0 && !ended ? 2 : 1, ended ? ACCEPT_TIMEOUT * 1000 : -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 || (n == 0 && ended))
            return -1;
        if (fds[0].revents)
            break;
        if (fds[1].revents)
            ended = 1;
    }
    if (read_full(sock, reply, 5) < 0 || reply[0] != 'X')
        return -1;
    return 0;
}

/* Send the request; 0 on success. */
static int send_request(int sock, int argc, char **argv, const sigset_t *sigmask)
{
    size_t envc = 0, len = 4 + 32;
    for (int i = 1; i < argc; i++)
        len += strlen(argv[i]) + 1;
    for (char **e = environ; *e; e++, envc++)
        len += strlen(*e) + 1;
    char *buf = malloc(len);
    if (!buf)
        return -1;
    mode_t mask = umask(0);
    umask(mask);
    put_u32(buf, (uint32_t)(len - 4));
    memcpy(buf + 4, "VZC2", 4);
    put_u32(buf + 8, (uint32_t)mask);
    uint64_t ignored = 0; /* what a Python vzctl started from here would find ignored (a shell's `cmd &`) */
    for (int sig = 1; sig <= 64; sig++) {
        struct sigaction sa;
        if (sig != SIGKILL && sig != SIGSTOP && sigaction(sig, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN)
            ignored |= (uint64_t)1 << (sig - 1);
    }
    uint64_t blocked = 0; /* our signal mask as it was before we blocked those we forward */
    for (int sig = 1; sig <= 64; sig++)
        if (sigismember(sigmask, sig) == 1)
            blocked |= (uint64_t)1 << (sig - 1);
    put_u32(buf + 12, (uint32_t)ignored);
    put_u32(buf + 16, (uint32_t)(ignored >> 32));
    put_u32(buf + 20, (uint32_t)blocked);
    put_u32(buf + 24, (uint32_t)(blocked >> 32));
    put_u32(buf + 28, (uint32_t)(argc - 1));
    put_u32(buf + 32, (uint32_t)envc);
    char *p = buf + 36;
    for (int i = 1; i < argc; i++)
        p = stpcpy(p, argv[i]) + 1;
    for (char **e = environ; *e; e++)
        p = stpcpy(p, *e) + 1;

    int cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd < 0) {
        free(buf);
        return -1;
    }
    int fds[4] = {0, 1, 2, cwd};
    char control[CMSG_SPACE(sizeof(fds))];
    memset(control, 0, sizeof(control));
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof(control)};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(cm), fds, sizeof(fds));
    int rc = 0;
    size_t sent = 0;
    while (sent < len) {
        ssize_t n = sent ? send(sock, buf + sent, len - sent, MSG_NOSIGNAL) : sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = -1;
            break;
        }
        sent += (size_t)n;
    }
    close(cwd);
    free(buf);
    return rc;
}

int main(int argc, char **argv)
{
    if (!served(argc, argv))
        run_directly(argc, argv);
    const char *path = getenv("VZCTL_SERVER_SOCKET");
    if (!path || !*path)
        path = VZCTL_SOCKET;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path))
        run_directly(argc, argv);
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    /* A server that does not take the command within ACCEPT_TIMEOUT (stopped, hung, its queue full) is no
     * server: the command runs here. Safe, as a command starts only once its client has the pid (server.py). */
    struct timeval limit = {.tv_sec = ACCEPT_TIMEOUT}, forever = {0};
    if (sock >= 0) {
        setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    }
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        run_directly(argc, argv); /* no server: the usual path */
    /* Only root's server gets the request. A socket anyone else listens on ($VZCTL_SERVER_SOCKET kept from a
     * user's environment by su or sudo -E) would get root's descriptors, arguments and environment, and could
     * name any pid as the command's for us to signal. */
    struct ucred peer;
    socklen_t peer_len = sizeof(peer);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) < 0 || peer.uid != 0) {
        close(sock);
        run_directly(argc, argv);
    }

    /* Signals that arrive before the command's pid is known wait (blocked), then go to the command. */
    sigset_t set, old;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof(forwarded) / sizeof(*forwarded); i++)
        sigaddset(&set, forwarded[i]);
    sigprocmask(SIG_BLOCK, &set, &old);

    unsigned char reply[5];
    if (read_full(sock, reply, 5) < 0 || reply[0] != 'R' || send_request(sock, argc, argv, &old) < 0 ||
        read_full(sock, reply, 5) < 0 || reply[0] != 'P') {
        /* not served (S), not taken in time, or the server went away before it started anything: run it here */
        close(sock);
        sigprocmask(SIG_SETMASK, &old, NULL);
        run_directly(argc, argv);
    }
    command_pid = (pid_t)get_u32(reply + 1);
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof(forever)); /* the command takes what it takes */
    if (command_pid <= 1) { /* never signal a process group, every process, or init */
        fprintf(stderr, "vzctl: error: the vzctl server answered with pid %d; whether the command runs is "
                        "unknown: check with vzctl status\n", (int)command_pid);
        return SERVER_LOST;
    }
    command_pidfd = (int)syscall(SYS_pidfd_open, command_pid, 0); /* (-1: ended already; the X is on its way) */
    /* all of them, also those ignored here: the command's vzctl has them ignored too (the request says so)
     * until it installs its own handlers, as a Python vzctl started from here would */
    struct sigaction sa = {.sa_handler = forward, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof(forwarded) / sizeof(*forwarded); i++) {
        struct sigaction was;
        if (forwarded[i] == SIGTSTP && (sigaction(SIGTSTP, NULL, &was) < 0 || was.sa_handler == SIG_IGN))
            continue; /* ignored (no job control): ^Z does nothing, as to a Python vzctl started from here */
        stop_too |= forwarded[i] == SIGTSTP;
        sigaction(forwarded[i], &sa, NULL);
    }
    sigprocmask(SIG_SETMASK, &old, NULL); /* (a signal that came meanwhile is forwarded here, before the A) */
    /* the go-ahead: the command starts only now, so a signal sent to us before this point reaches it first */
    while (send(sock, "A", 1, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;

    if (wait_end(sock, reply) < 0) {
        fprintf(stderr, "vzctl: error: the vzctl server stopped while it ran this command (pid %d); whether the "
                        "command finished is unknown: check with vzctl status\n", (int)command_pid);
        return SERVER_LOST;
    }
    int status = (int)get_u32(reply + 1);
    if (WIFSIGNALED(status)) { /* die the same way, as the shell expects of a killed command */
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL);
        sigemptyset(&set);
        sigaddset(&set, sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        raise(sig);
        return 128 + sig;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
