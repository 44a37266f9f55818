"""The Java side of the Java kernel (``java_kernel``): a small program around JShell.

It is kept here as source (the agents' directory carries Python modules only) and compiled
once per version: ahead in the template's build, else on the kernel's first start.

Requests, a line each on stdin: ``E <code>`` evaluates, ``S`` stops what runs. Replies, a line
each on stdout: ``O``/``R`` the user's stdout/stderr, ``V`` the value of the last expression,
``X <name> <value> <traceback>`` an error, ``D`` done (also once when ready). Every field is
base64 (UTF-8).
"""

from __future__ import annotations

CLASS_NAME = "BilikJShell"

SOURCE = r"""
import static java.nio.charset.StandardCharsets.UTF_8;

import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.stream.Collectors;
import jdk.jshell.DeclarationSnippet;
import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.JShellException;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;

public final class BilikJShell {
    private static final PrintStream PROTOCOL =
            new PrintStream(new FileOutputStream(FileDescriptor.out), false, UTF_8);
    // What jshell's command line imports at start.
    private static final String[] IMPORTS = {
        "java.io.*", "java.math.*", "java.net.*", "java.nio.file.*", "java.util.*",
        "java.util.concurrent.*", "java.util.function.*", "java.util.prefs.*",
        "java.util.regex.*", "java.util.stream.*",
    };

    static void send(String kind, String... fields) {
        StringBuilder line = new StringBuilder(kind);
        for (String field : fields) {
            line.append(' ').append(Base64.getEncoder().encodeToString(field.getBytes(UTF_8)));
        }
        sendLine(line.toString());
    }

    static synchronized void sendLine(String line) {
        PROTOCOL.print(line + "\n");
        PROTOCOL.flush();
    }

    /** The user's output, sent at each flush (and every few milliseconds, for what a write
     *  of a single byte leaves unflushed). */
    static final class Channel extends OutputStream {
        private final String kind;
        private final ByteArrayOutputStream pending = new ByteArrayOutputStream();

        Channel(String kind) {
            this.kind = kind;
        }

        @Override
        public synchronized void write(int b) {
            pending.write(b);
        }

        @Override
        public synchronized void write(byte[] b, int off, int len) {
            pending.write(b, off, len);
        }

        @Override
        public synchronized void flush() {
            if (pending.size() > 0) {
                sendLine(kind + " " + Base64.getEncoder().encodeToString(pending.toByteArray()));
                pending.reset();
            }
        }
    }

    private final Channel out = new Channel("O");
    private final Channel err = new Channel("R");
    private final JShell shell;

    BilikJShell() {
        InputStream nothing = InputStream.nullInputStream();
        // Flushed at every write, as IJava's are: System.out.println("x") is two stream
        // messages, "x" and a newline (a subclass's println prints, then ends the line, where
        // PrintStream's own writes both at once).
        PrintStream userOut = new PrintStream(out, true, UTF_8) {};
        PrintStream userErr = new PrintStream(err, true, UTF_8) {};
        // The environment, readable as system properties too: per-execution variables can
        // only come as properties (a JVM's environment is fixed), so the sandbox's own are
        // read the same way.
        System.getenv().forEach(System.getProperties()::putIfAbsent);
        // Snippets run in this JVM ("local"), so there is no second JVM to start, and what they
        // print goes through System.out and System.err, which are the channels.
        System.setIn(nothing);
        System.setOut(userOut);
        System.setErr(userErr);
        shell = JShell.builder().executionEngine("local").in(nothing).out(userOut).err(userErr)
                .build();
        for (String name : IMPORTS) {
            shell.eval("import " + name + ";");
        }
    }

    void flushOutput() {
        System.out.flush();
        System.err.flush();
    }

    void evaluate(String code) {
        try {
            String value = run(code);
            flushOutput();
            if (value != null) {
                send("V", value);
            }
        } catch (RuntimeException e) {
            flushOutput();
            send("X", e.getClass().getName(), String.valueOf(e.getMessage()), e.toString());
        } finally {
            send("D");
        }
    }

    /** Evaluates the snippets of ``code`` in turn up to the first error; the last value. */
    private String run(String code) {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String remaining = code;
        String value = null;
        while (!remaining.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(remaining);
            String source = info.source();
            if (source == null || !info.completeness().isComplete()) {
                source = remaining; // incomplete: the compiler says what is missing
                remaining = "";
            } else {
                remaining = info.remaining();
            }
            value = null;
            for (SnippetEvent event : shell.eval(source)) {
                if (event.causeSnippet() != null) {
                    continue; // a snippet that depends on this one, updated
                }
                if (event.status() == Snippet.Status.REJECTED) {
                    compileError(event.snippet());
                    return null;
                }
                if (event.exception() != null) {
                    runtimeError(event.exception());
                    return null;
                }
                if (isExpression(event.snippet())) {
                    value = event.value();
                }
            }
        }
        return value;
    }

    /** Whether a snippet's value is a result, as an expression's (not a declaration's). */
    private static boolean isExpression(Snippet snippet) {
        return snippet.kind() == Snippet.Kind.EXPRESSION
                || snippet.subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND;
    }

    private void compileError(Snippet snippet) {
        String source = snippet.source();
        List<String> messages = new ArrayList<>();
        List<String> lines = new ArrayList<>();
        for (Diag diag : shell.diagnostics(snippet).collect(Collectors.toList())) {
            if (!diag.isError()) {
                continue;
            }
            String message = diag.getMessage(Locale.ROOT);
            messages.add(message);
            lines.add(message);
            // The line it is on, and a caret under the place.
            int at = (int) Math.max(0, Math.min(diag.getPosition(), source.length()));
            int start = source.lastIndexOf('\n', at - 1) + 1;
            int end = source.indexOf('\n', at);
            lines.add(source.substring(start, end < 0 ? source.length() : end));
            lines.add(" ".repeat(at - start) + "^");
        }
        flushOutput();
        send("X", "CompilationException", String.join("\n", messages), String.join("\n", lines));
    }

    private void runtimeError(JShellException exception) {
        flushOutput();
        if (exception instanceof EvalException) {
            EvalException e = (EvalException) exception;
            String message = e.getMessage() == null ? "" : e.getMessage();
            send("X", e.getExceptionClassName(), message, trace(e));
        } else if (exception instanceof UnresolvedReferenceException) {
            DeclarationSnippet snippet = ((UnresolvedReferenceException) exception).getSnippet();
            String missing =
                    shell.unresolvedDependencies(snippet).collect(Collectors.joining(", "));
            String message = snippet.name() + " cannot be used until " + missing + " is declared";
            send("X", "UnresolvedReferenceException", message, message);
        } else {
            String message = String.valueOf(exception.getMessage());
            send("X", exception.getClass().getSimpleName(), message, exception.toString());
        }
    }

    /** A stack trace as Java prints it, with the snippets' frames as jshell names them. */
    private static String trace(EvalException e) {
        StringBuilder text = new StringBuilder();
        for (Throwable current = e; current != null; current = current.getCause()) {
            String name = current instanceof EvalException
                    ? ((EvalException) current).getExceptionClassName()
                    : current.getClass().getName();
            text.append(text.length() > 0 ? "Caused by: " : "").append(name);
            if (current.getMessage() != null) {
                text.append(": ").append(current.getMessage());
            }
            text.append('\n');
            for (StackTraceElement frame : current.getStackTrace()) {
                String file = frame.getFileName();
                String cls = frame.getClassName();
                if (file != null && file.startsWith("#")) { // a snippet's: #id and line
                    String where = cls.isEmpty()
                            ? frame.getMethodName() : cls + "." + frame.getMethodName();
                    text.append("\tat ").append(where.isEmpty() ? "" : where + " ").append('(')
                            .append(file).append(':').append(frame.getLineNumber()).append(")\n");
                } else if (!cls.startsWith("jdk.internal.")
                        && !cls.startsWith("java.lang.reflect.")) {
                    text.append("\tat ").append(frame).append('\n');
                }
            }
        }
        return text.toString().stripTrailing();
    }

    public static void main(String[] args) throws Exception {
        InputStream stdin = new FileInputStream(FileDescriptor.in);
        BilikJShell kernel = new BilikJShell();
        ExecutorService evaluator = Executors.newSingleThreadExecutor();
        Thread flusher = new Thread(() -> {
            while (true) {
                try {
                    Thread.sleep(20);
                } catch (InterruptedException e) {
                    return;
                }
                kernel.flushOutput();
            }
        });
        flusher.setDaemon(true);
        flusher.start();
        send("D"); // ready
        BufferedReader requests = new BufferedReader(new InputStreamReader(stdin, UTF_8));
        for (String line; (line = requests.readLine()) != null; ) {
            if (line.startsWith("E ")) {
                byte[] code = Base64.getDecoder().decode(line.substring(2));
                evaluator.submit(() -> kernel.evaluate(new String(code, UTF_8)));
            } else if (line.equals("S")) {
                kernel.shell.stop();
            }
        }
        System.exit(0); // the kernel is gone
    }
}
"""
