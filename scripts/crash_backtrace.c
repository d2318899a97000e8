/* A native stack for a process that dies of a signal, for the GPU sessions
 * (gpu_check.sh), whose machines have no gdb: preloaded into a test run
 * (LD_PRELOAD), it prints the C/C++ frames of a SIGSEGV, SIGBUS, SIGFPE or
 * SIGILL to stderr and then lets the signal take its default course.
 * Python's faulthandler (on under pytest) prints the Python frames first
 * and then hands the signal on to this handler, installed before it.
 * Frames in an extension print as "lib.so(+0xOFFSET)"; gpu_check.sh's
 * `symbolize` turns fused_optim's into function, file and line.
 *
 *   cc -shared -fPIC -O1 -o crash_backtrace.so scripts/crash_backtrace.c
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void print_native_stack(int sig) {
  static const char head[] = "\n== native stack (crash_backtrace.c), signal ";
  void* frames[128];
  const int count = backtrace(frames, 128);
  const char* name = strsignal(sig);
  (void)!write(STDERR_FILENO, head, sizeof head - 1);
  (void)!write(STDERR_FILENO, name, strlen(name));
  (void)!write(STDERR_FILENO, "\n", 1);
  backtrace_symbols_fd(frames, count, STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  const int fatal[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
  void* warm[1];
  backtrace(warm, 1); /* loads libgcc's unwinder now, not inside the handler */
  for (size_t k = 0; k < sizeof fatal / sizeof fatal[0]; ++k) {
    signal(fatal[k], print_native_stack);
  }
}
