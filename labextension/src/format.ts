/** Formatting for people: SOL amounts, sizes, durations. */

const LAMPORTS_PER_SOL = 1_000_000_000;

/** `120000000` → `"0.12 SOL"` (exact to the lamport, trailing zeros dropped). */
export function sol(lamports: number | null | undefined, unit = ' SOL'): string {
  if (lamports === null || lamports === undefined) {
    return '–';
  }
  const sign = lamports < 0 ? '-' : '';
  const abs = Math.abs(Math.round(lamports));
  const whole = Math.floor(abs / LAMPORTS_PER_SOL);
  const frac = String(abs % LAMPORTS_PER_SOL)
    .padStart(9, '0')
    .replace(/0+$/, '');
  return `${sign}${whole}${frac ? '.' + frac : ''}${unit}`;
}

/** A cost that changes every second: 6 decimals, so the digits do not dance, and 9 only
 * where the amount has digits below a micro-SOL, so figures that add up still add up. */
export function solShort(lamports: number | null | undefined): string {
  if (lamports === null || lamports === undefined) {
    return '–';
  }
  const sign = lamports < 0 ? '-' : '';
  const abs = Math.abs(Math.round(lamports));
  const frac = String(abs % LAMPORTS_PER_SOL).padStart(9, '0');
  const shown = frac.endsWith('000') ? frac.slice(0, 6) : frac;
  return `${sign}${Math.floor(abs / LAMPORTS_PER_SOL)}.${shown} SOL`;
}

/** `25769803776` → `"24 GB"`. */
export function gigabytes(bytes: number): string {
  const gb = bytes / 2 ** 30;
  return Math.abs(gb - Math.round(gb)) < 0.05 ? `${Math.round(gb)} GB` : `${gb.toFixed(1)} GB`;
}

/** `3725` → `"1:02:05"`, `65` → `"1:05"`. */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** `"7xKXtg2CW87d97TXJSDpbD5jBkheTqA83TZRuJosgAsU"` → `"7xKX…gAsU"`. */
export function shortKey(key: string | null | undefined): string {
  if (!key) {
    return '–';
  }
  return key.length > 12 ? `${key.slice(0, 4)}…${key.slice(-4)}` : key;
}

/** `"0.05"` → `50000000` lamports, exactly; null for anything that is not a positive SOL
 * amount with at most nine decimals. */
export function parseSol(text: string): number | null {
  const match = /^\s*(\d+)(?:\.(\d{1,9}))?\s*$/.exec(text);
  if (!match) {
    return null;
  }
  const lamports =
    Number(match[1]) * LAMPORTS_PER_SOL + Number((match[2] ?? '').padEnd(9, '0') || '0');
  return Number.isSafeInteger(lamports) && lamports > 0 ? lamports : null;
}

/** A number of hours for people: `2 h`, `1.5 h`, `30 min`, `30 s`. */
export function hours(h: number): string {
  if (h >= 1) {
    return `${Number(h.toFixed(2))} h`;
  }
  if (h * 60 >= 1) {
    return `${Number((h * 60).toFixed(1))} min`;
  }
  return `${Math.round(h * 3600)} s`;
}
